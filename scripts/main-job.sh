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

ECG_DIR=${MEDSCREEN_ECG_DIR:-../shared/datasets/mitdb}
ECG_WAVEFORM=${MEDSCREEN_DEMO_WAVEFORM:-../shared/datasets/dicom/pydicom_waveform_ecg.dcm}
export MEDSCREEN_STATE_DIR="$STATE"

echo "== 1/8 train $RECIPE (tracked in MLflow: ${MLFLOW_TRACKING_URI:-sqlite:///$STATE/mlflow.db})"
RUN_ID=$(medscreen train "$RECIPE" | tail -n 1)
echo "run id: $RUN_ID"

echo "== 2/8 export to ONNX through the release gate, register"
EXPORTED=$(medscreen export --run-id "$RUN_ID" | tail -n 1)
read -r MODEL_NAME MODEL_VERSION <<<"$EXPORTED"
echo "registered: $MODEL_NAME version $MODEL_VERSION"

echo "== 3/8 approve: $MODEL_NAME version $MODEL_VERSION becomes @champion"
medscreen models promote "$MODEL_NAME" "$MODEL_VERSION" --to champion \
  --approver "${MEDSCREEN_APPROVER:-main-job}" --reason "main job demo release of run $RUN_ID"

if [ -f "$ECG_DIR/101.hea" ]; then
  echo "== 4/8 ECG monitoring: train on MIT-BIH DS1 ($ECG_DIR), export, approve"
  ECG_RUN_ID=$(medscreen train training/recipes/ecg-full.yaml \
    --set "data.records_dir=$ECG_DIR" | tail -n 1)
  EXPORTED=$(medscreen export --run-id "$ECG_RUN_ID" | tail -n 1)
  read -r ECG_NAME ECG_VERSION <<<"$EXPORTED"
  medscreen models promote "$ECG_NAME" "$ECG_VERSION" --to champion \
    --approver "${MEDSCREEN_APPROVER:-main-job}" --reason "main job demo release of run $ECG_RUN_ID"
else
  echo "== 4/8 ECG monitoring skipped: no WFDB records in $ECG_DIR (set MEDSCREEN_ECG_DIR)"
fi

echo "== 5/8 an API key for a demo hospital (stored hashed in $STATE/serving/)"
KEY_OUTPUT=$(medscreen keys create --hospital "Demo Hospital" --region demo --model '*')
API_KEY=$(grep -o 'msk_[A-Za-z0-9_-]*' <<<"$KEY_OUTPUT" | head -n 1)
if [ -z "$API_KEY" ]; then echo "error: no API key in: $KEY_OUTPUT" >&2; exit 1; fi
export MEDSCREEN_API_KEY="$API_KEY"

echo "== 6/8 serve every @champion model on 127.0.0.1:$PORT (log: $STATE/serve.log)"
medscreen serve --port "$PORT" >"$STATE/serve.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null || true' EXIT
READY=""
for _ in $(seq 120); do
  if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; then READY=1; break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$STATE/serve.log"; exit 1; fi
  sleep 1
done
if [ -z "$READY" ]; then
  echo "error: the service on port $PORT was not ready within 120 s (log: $STATE/serve.log)" >&2
  exit 1
fi

echo "== 7/8 screen $IMAGE"
medscreen predict "$IMAGE" --url "http://127.0.0.1:$PORT" --model "$MODEL_NAME"
if [ -n "${ECG_NAME:-}" ]; then
  echo "== 7/8 monitor the DICOM ECG waveform $ECG_WAVEFORM (summary)"
  medscreen predict "$ECG_WAVEFORM" --monitor --url "http://127.0.0.1:$PORT" \
    | .venv/bin/python -c 'import json, sys; a = json.load(sys.stdin); a.pop("beats", None); print(json.dumps(a, indent=2))'
fi

echo "== 8/8 verify the hash-chained prediction log"
medscreen audit verify
