"""The run card: a Markdown summary of every training run, logged beside its weights.

The registered model card (``card.md``, written at export) describes a released version; the
run card describes a training run, released or not, so a reviewer can judge any run from the
MLflow UI without reading JSON artifacts.
"""

from __future__ import annotations

import math
import re

import mlflow

from datasets.manifest import TaskSpec
from training.recipe import Recipe
from training.tracking import package_versions

RUN_CARD_ARTIFACT = "card/run_card.md"
_RATES = ("auc", "sensitivity", "specificity", "ppv", "npv")
_ALL = (*_RATES, "accuracy_at_threshold", "ece")


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _interval(metrics: dict[str, float], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return ""
    return f"{_number(low)} to {_number(high)}"


def _metric_table(metrics: dict[str, float], prefix: str) -> str:
    rows = [
        f"| {name} | {_number(metrics[f'{prefix}_{name}'])} | "
        f"{_interval(metrics, f'{prefix}_{name}')} |"
        for name in _ALL
        if f"{prefix}_{name}" in metrics
    ]
    cases = metrics.get(f"{prefix}_cases")
    positives = metrics.get(f"{prefix}_positives")
    header = ""
    if cases is not None:
        header = f"{int(cases)} cases, {int(positives or 0)} positive.\n\n"
    return header + "| metric | value | 95% interval |\n|---|---|---|\n" + "\n".join(rows)


def _site_table(metrics: dict[str, float], sites: dict[str, int]) -> str:
    lines = ["| site | rows | AUC | sensitivity | specificity |", "|---|---|---|---|---|"]
    for site, rows in sorted(sites.items()):
        # The same name screening_report gives the site's metrics.
        prefix = "test_site_" + re.sub(r"[^A-Za-z0-9_-]", "_", site)
        values = [metrics.get(f"{prefix}_{name}") for name in ("auc", "sensitivity", "specificity")]
        shown = (
            [_number(value) for value in values]
            if values[0] is not None
            else ["one class only"] + ["n/a"] * 2
        )
        lines.append(f"| {site} | {rows} | {' | '.join(shown)} |")
    return "\n".join(lines)


def _lineage_section(lineage: dict) -> str:
    lines = [
        f"**Dataset.** {lineage['dataset']} ({lineage['licence']}), {lineage['url']}, "
        f"SHA-256 `{lineage['file_sha256']}`."
    ]
    if lineage.get("source") == "manifest":
        lines.append(
            f"Manifest of {lineage['patients']} patients, split {lineage['split_rule']}; "
            f"val {lineage['val_fraction']:g}, test {lineage['test_fraction']:g} of patients, "
            f"seed {lineage['split_seed']}. Image content SHA-256 "
            f"`{lineage['manifest_content_sha256']}`."
        )
    if lineage.get("citation"):
        lines.append(f"Cite: {lineage['citation']}")
    table = ["| split | rows | patients | fingerprint (SHA-256) |", "|---|---|---|---|"]
    for name, split in lineage["splits"].items():
        patients = split.get("patients", "")
        table.append(f"| {name} | {split['rows']} | {patients} | `{split['fingerprint_sha256']}` |")
    return "\n".join(lines) + "\n\n" + "\n".join(table)


def _gate_section(recipe: Recipe, metrics: dict[str, float]) -> str:
    minimums = recipe.registration.minimum_metrics
    if not minimums:
        return "- the recipe states no minimum metrics"
    lines = []
    for name, minimum in minimums.items():
        value = metrics.get(name)
        verdict = "missing" if value is None else ("meets" if value >= minimum else "BELOW")
        lines.append(f"- {name}: {_number(value)} {verdict} the minimum {minimum:g}")
    return "\n".join(lines)


def render_run_card(
    *,
    run_id: str,
    recipe: Recipe,
    spec: TaskSpec,
    operating_point: dict,
    lineage: dict,
    tags: dict[str, str],
) -> str:
    """Render the Markdown run card of a finished training run.

    Args:
        run_id: The MLflow run.
        recipe: The recipe it ran.
        spec: Its task (catalogue entry or manifest task).
        operating_point: Threshold, sensitivity target, temperature and metrics, as logged.
        lineage: The run's data lineage, as logged.
        tags: The run's provenance tags.

    Returns:
        The card, in Markdown.
    """
    metrics: dict[str, float] = operating_point["metrics"]
    registration = recipe.registration
    limitations = "\n".join(f"- {line}" for line in registration.limitations) or "- none stated"
    positive = ", ".join(spec.classes[index] for index in spec.positive_classes)
    versions = ", ".join(f"{name} {version}" for name, version in package_versions(tags).items())
    sites = lineage["splits"].get("test", {}).get("sites")
    site_section = f"\n\n### Test, per site\n\n{_site_table(metrics, sites)}" if sites else ""
    interval_note = (
        "bootstrap over patients (a patient's images are resampled together)"
        if lineage.get("source") == "manifest"
        else "AUC by bootstrap over images, rates by Wilson"
    )
    return f"""# Run card: {recipe.name}

Training run `{run_id}` (experiment `{recipe.experiment}`), to be registered as
`{registration.model_name}`. This describes the run; a registered version's card is written at
export, after the release gate.

**Task.** {spec.task}. **Modality.** {spec.modality}.

**Intended use.** {registration.intended_use}

**Limitations.**
{limitations}

**Classes.** {", ".join(spec.classes)}. **Positive finding:** {spec.positive_finding}
(classes: {positive}). Input: uint8 {list(spec.image_shape)}.

## Operating point

Threshold **{operating_point["threshold"]:.6f}** on the {spec.positive_finding} probability,
chosen on the validation split for sensitivity >= {operating_point["sensitivity_target"]:g};
softmax temperature {operating_point["temperature"]:.4f} (fitted on validation);
{operating_point["rule"]}. Best epoch: {int(metrics.get("best_epoch", -1))}.

## Metrics

### Validation, at the threshold (selected on this split)

{_metric_table(metrics, "selected_val")}

### Test (held out, computed once; test AUC **{_number(metrics.get("test_auc"))}**)

95% intervals: {interval_note}.

{_metric_table(metrics, "test")}{site_section}

### Release gate (checked again at export)

{_gate_section(recipe, metrics)}

## Data lineage

{_lineage_section(lineage)}

## Provenance

- Commit: `{tags.get("medscreen.git_commit", "unknown")}` (uncommitted changes:
  {tags.get("medscreen.git_dirty", "unknown")})
- Seed: {recipe.seed}
- Python {tags.get("medscreen.python_version", "unknown")}; {versions}
"""


def log_run_card(
    *,
    run_id: str,
    recipe: Recipe,
    spec: TaskSpec,
    operating_point: dict,
    lineage: dict,
    tags: dict[str, str],
) -> str:
    """Render the run card and log it to the active run as ``card/run_card.md``.

    Returns:
        The card, in Markdown.
    """
    card = render_run_card(
        run_id=run_id,
        recipe=recipe,
        spec=spec,
        operating_point=operating_point,
        lineage=lineage,
        tags=tags,
    )
    mlflow.log_text(card, RUN_CARD_ARTIFACT)
    return card
