#!/usr/bin/env bash
# Main job: set up, then train -> track -> export (release gate) -> register -> approve
# -> serve -> one real prediction.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
if [ -z "${MEDSCREEN_DATA_DIR:-}" ] && [ -d ../shared/datasets/medmnist ]; then
  export MEDSCREEN_DATA_DIR=../shared/datasets/medmnist  # else: download with checksums
fi
IMAGE=${MEDSCREEN_DEMO_IMAGE:-../shared/datasets/dicom/nih_chestxray14_dx_1024.dcm}
RECIPE=${MEDSCREEN_RECIPE:-training/recipes/pneumonia-quick.yaml}
PORT=${MEDSCREEN_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
STATE=${MEDSCREEN_STATE_DIR:-mlruns}
mkdir -p "$STATE"

echo "== 1/5 train $RECIPE (tracked in MLflow: ${MLFLOW_TRACKING_URI:-sqlite:///$STATE/mlflow.db})"
RUN_ID=$(medscreen train "$RECIPE" | tail -n 1)
echo "run id: $RUN_ID"

echo "== 2/5 export to ONNX through the release gate, register"
read -r MODEL_NAME MODEL_VERSION < <(medscreen export --run-id "$RUN_ID" | tail -n 1)
echo "registered: $MODEL_NAME version $MODEL_VERSION"

echo "== 3/5 approve: $MODEL_NAME version $MODEL_VERSION becomes @champion"
medscreen models promote "$MODEL_NAME" "$MODEL_VERSION" --to champion \
  --approver "${MEDSCREEN_APPROVER:-main-job}" --reason "main job demo release of run $RUN_ID"

echo "== 4/5 serve $MODEL_NAME@champion on 127.0.0.1:$PORT (log: $STATE/serve.log)"
medscreen serve --model "$MODEL_NAME@champion" --port "$PORT" >"$STATE/serve.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$STATE/serve.log"; exit 1; fi
  sleep 1
done

echo "== 5/5 screen $IMAGE"
medscreen predict "$IMAGE" --url "http://127.0.0.1:$PORT"
