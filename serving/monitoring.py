"""The answer of ``POST /v1/monitor``: per-beat classes and an alert summary for the reviewer.

Each beat takes its most probable AAMI class. A beat raises an ectopic alert when its S + V
probability reaches the model's threshold (chosen on validation records for a sensitivity
target), so alerts can include beats whose most probable class is N: the threshold trades false
alarms for missed ectopy, as the card states. A signal without distinct QRS complexes (see
:data:`datasets.waveforms.MIN_SIGNAL_KURTOSIS`) is an alert of its own, whatever its beats say.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.inputs import EcgBeats
from serving.model import ServedModel

VENTRICULAR_RUN_BEATS = 3  # three or more consecutive V beats: non-sustained VT territory


def _longest_run(flags: np.ndarray) -> int:
    longest = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        longest = max(longest, current)
    return longest


def monitoring_answer(
    model: ServedModel, beats: EcgBeats, probabilities: np.ndarray
) -> tuple[dict[str, Any], float, dict[str, int | float | str]]:
    """Build the response, the log score (highest ectopic probability) and the log summary.

    Args:
        model: The ECG model that produced ``probabilities``.
        beats: The detected beats (times refer to the signal as sent).
        probabilities: (beats, classes) from the model.

    Returns:
        The JSON answer (without request id), the score and the summary counts for the log.
    """
    classes = model.card.classes
    predicted = probabilities.argmax(axis=1)
    # In float64, as each beat shows it: compared in float32, the threshold was rounded too.
    ectopic = model.positive_probability(probabilities).astype(np.float64)
    alerts = ectopic >= model.threshold
    counts = {name: int((predicted == index).sum()) for index, name in enumerate(classes)}
    ventricular = classes.index("V") if "V" in classes else None
    longest_v_run = _longest_run(predicted == ventricular) if ventricular is not None else 0
    mean_rr = float(np.diff(beats.peak_times_s).mean()) if len(beats) > 1 else float("nan")
    findings = []
    if counts.get("V", 0):
        findings.append(
            {
                "finding": "ventricular ectopic beats",
                "beats": counts["V"],
                "longest_run": longest_v_run,
                "priority": "high" if longest_v_run >= VENTRICULAR_RUN_BEATS else "review",
            }
        )
    if counts.get("S", 0):
        findings.append(
            {
                "finding": "supraventricular ectopic beats",
                "beats": counts["S"],
                "priority": "review",
            }
        )
    if not beats.quality_acceptable:
        # A technical alarm, not silence: noise, a lead off or a calibration signal, but also a
        # rhythm without distinct QRS complexes (ventricular flutter or fibrillation).
        findings.insert(
            0,
            {
                "finding": "signal quality too low to classify beats",
                "detail": "no distinct QRS complexes: noise, a loose lead, a test signal, or a "
                "rhythm such as ventricular flutter or fibrillation; check the patient and the "
                "lead, and do not rely on the beat classes",
                "spans_s": [list(span) for span in beats.low_quality_spans_s],
                "priority": "high",
            },
        )
    decision = "alert" if alerts.any() or not beats.quality_acceptable else "no alert"
    answer = {
        "model": {"name": model.name, "version": model.version, "alias": model.alias},
        "finding": model.card.positive_finding,
        "threshold": model.threshold,
        "sensitivity_target": model.card.operating_point.sensitivity_target,
        "decision": decision,
        "summary": {
            "beats": len(beats),
            "class_counts": counts,
            "ectopic_alert_beats": int(alerts.sum()),
            "heart_rate_bpm": round(60.0 / mean_rr, 1) if np.isfinite(mean_rr) else None,
            "signal_quality": {
                "kurtosis": round(beats.signal_kurtosis, 2),
                "acceptable": beats.quality_acceptable,
            },
            "findings": findings,
        },
        "beats": [
            {
                "time_s": round(float(time_s), 4),
                "sample": int(sample),
                "class": classes[int(index)],
                "probability": round(float(row[index]), 6),
                # Unrounded: rounded, a score just over the threshold read as under it.
                "ectopic_probability": float(score),
                "alert": bool(alert),
            }
            for time_s, sample, index, row, score, alert in zip(
                beats.peak_times_s,
                beats.peak_samples,
                predicted,
                probabilities,
                ectopic,
                alerts,
                strict=True,
            )
        ],
    }
    summary: dict[str, int | float | str] = {
        "beats": len(beats),
        "alert_beats": int(alerts.sum()),
        "signal_kurtosis": round(beats.signal_kurtosis, 2),
        **{f"class_{name}": count for name, count in counts.items()},
    }
    return answer, float(ectopic.max()), summary
