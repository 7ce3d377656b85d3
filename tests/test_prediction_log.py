"""The hash-chained prediction log: appending, group commit, tampering, `medscreen audit verify`."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import multiprocessing
import os
import stat
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from medscreen_cli import app
from serving.prediction_log import (
    GENESIS_HASH,
    INTERRUPTED_WRITE_FIELD,
    MAX_LINE_BYTES,
    PredictionLog,
    PredictionLogError,
    PredictionRecord,
    VerificationResult,
    canonical_json,
    chain_hash,
    head_path_for,
    verify_log,
)
from tests.conftest import medscreen_error_line


def _record(number: int, hospital: str = "St Mary") -> PredictionRecord:
    return PredictionRecord(
        request_id=f"req-{number}",
        outcome="prediction",
        status=200,
        route="/v1/screen",
        hospital=hospital,
        region="eu-west",
        key_id="0123456789ab",
        model_name="pneumonia-screening",
        model_version="3",
        model_alias="champion",
        input_sha256="ab" * 32,
        input_format="png",
        score=0.125 + number / 1000,
        threshold=0.5,
        decision="negative",
        summary={"N": 12, "V": 1},
        latency_ms=3.5,
    )


def _failure(number: int) -> PredictionRecord:
    return PredictionRecord(
        request_id=f"req-{number}",
        outcome="failed",
        status=415,
        route="/v1/screen",
        error="not a PNG, JPEG or DICOM file",
        latency_ms=0.4,
    )


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "serving" / "predictions.jsonl"
    with PredictionLog(path) as log:
        for number in range(1, 11):
            log.append(_record(number) if number % 4 else _failure(number))
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _only_problem(path: Path) -> str:
    result = verify_log(path)
    assert not result.ok
    assert result.problems, result
    return "\n".join(result.problems)


def test_appended_records_form_an_intact_chain(log_path: Path) -> None:
    result = verify_log(log_path)
    assert result.ok, result.problems
    assert result.records == 10
    lines = [json.loads(line) for line in _lines(log_path)]
    assert [line["seq"] for line in lines] == list(range(1, 11))
    assert lines[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(lines))
    head = json.loads(head_path_for(log_path).read_text())
    assert head == {"seq": 10, "hash": lines[-1]["hash"]}
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert lines[3]["outcome"] == "failed" and lines[3]["score"] is None


def test_append_returns_the_stored_line(tmp_path: Path) -> None:
    with PredictionLog(tmp_path / "log.jsonl") as log:
        first = log.append(_record(1))
        second = log.append(_record(2))
    assert (first["seq"], first["prev_hash"]) == (1, GENESIS_HASH)
    assert (second["seq"], second["prev_hash"]) == (2, first["hash"])
    assert second["request_id"] == "req-2" and len(second["hash"]) == 64
    assert json.loads(_lines(tmp_path / "log.jsonl")[1]) == second


def test_an_edited_field_names_its_line(log_path: Path) -> None:
    lines = _lines(log_path)
    edited = json.loads(lines[4])
    edited["decision"] = "positive"
    lines[4] = json.dumps(edited) + "\n"
    log_path.write_text("".join(lines))
    result = verify_log(log_path)
    assert not result.ok
    assert len(result.problems) == 1
    assert result.problems[0].startswith("line 5 (seq 5): the record was altered")


def test_a_deleted_middle_line_is_detected(log_path: Path) -> None:
    lines = _lines(log_path)
    del lines[4]
    log_path.write_text("".join(lines))
    assert "line 5: seq 6 where 5 was expected" in _only_problem(log_path)


def test_an_inserted_copy_is_detected(log_path: Path) -> None:
    lines = _lines(log_path)
    lines.insert(6, lines[2])
    log_path.write_text("".join(lines))
    assert "line 7: seq 3 where 7 was expected" in _only_problem(log_path)


def test_reordered_lines_are_detected(log_path: Path) -> None:
    lines = _lines(log_path)
    lines[3], lines[4] = lines[4], lines[3]
    log_path.write_text("".join(lines))
    assert "line 4: seq 5 where 4 was expected" in _only_problem(log_path)


def test_a_deleted_last_line_is_detected_through_the_head_file(log_path: Path) -> None:
    log_path.write_text("".join(_lines(log_path)[:-1]))
    problems = _only_problem(log_path)
    assert "records seq 10 but the last record is seq 9" in problems
    assert "removed from the end" in problems


def test_a_line_that_is_not_json_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    lines.insert(2, "patient: Jane Doe\n")
    log_path.write_text("".join(lines))
    assert "line 3: not JSON" in _only_problem(log_path)


def _with_field(line: str, key: str, value: str) -> str:
    """The line with one field's JSON text replaced, the rest as written."""
    record = json.loads(line)
    record[key] = "\0"
    return json.dumps(record).replace('"\\u0000"', value) + "\n"


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda lines: lines.insert(2, "\n"), "line 3: empty line"),
        (
            lambda lines: lines.insert(2, '{"decision": "positive"}\n'),
            "line 3: not a prediction log record (no valid seq, prev_hash, hash)",
        ),
        (
            lambda lines: lines.__setitem__(2, _with_field(lines[2], "hash", '"' + "g" * 64 + '"')),
            "line 3: not a prediction log record (no valid seq, prev_hash, hash)",
        ),
        (
            lambda lines: lines.__setitem__(2, _with_field(lines[2], "score", "NaN")),
            "line 3 (seq 3): the record was altered after it was written (hash mismatch)",
        ),
        (
            lambda lines: lines.__setitem__(2, lines[2][:40] + "\n"),
            "line 3: not JSON",  # the start of a record that the chain does not skip
        ),
    ],
    ids=["blank line", "not a record", "non-hex hash", "NaN score", "cut record"],
)
def test_each_kind_of_damage_is_named(log_path: Path, tamper, problem: str) -> None:
    lines = _lines(log_path)
    tamper(lines)
    log_path.write_text("".join(lines))
    assert problem in verify_log(log_path).problems


@pytest.mark.parametrize(
    ("head_text", "problem"),
    [
        ("seq 10", "predictions.jsonl.head.json: the head file is not JSON"),
        ("{}", "predictions.jsonl.head.json: the head file has no valid seq and hash"),
    ],
)
def test_a_damaged_head_file_is_named(log_path: Path, head_text: str, problem: str) -> None:
    head_path_for(log_path).write_text(head_text)
    assert verify_log(log_path).problems == [problem]


def test_a_rewritten_chain_does_not_match_the_head(log_path: Path, tmp_path: Path) -> None:
    # Someone regenerates a self-consistent log of the same length: only the head catches it.
    forged = tmp_path / "forged.jsonl"
    with PredictionLog(forged) as log:
        for number in range(1, 11):
            log.append(_record(number + 100))
    log_path.write_bytes(forged.read_bytes())
    assert "does not have the hash the head file records" in _only_problem(log_path)


def test_missing_logs_and_head_files(tmp_path: Path, log_path: Path) -> None:
    assert verify_log(tmp_path / "never-written.jsonl") == verify_log(tmp_path / "x.jsonl")
    empty = verify_log(tmp_path / "never-written.jsonl")
    assert empty.ok and empty.records == 0

    head_path_for(log_path).unlink()
    assert ".head.json is missing" in _only_problem(log_path)

    with PredictionLog(log_path) as log:  # writes a head again
        log.append(_record(11))
    log_path.unlink()
    assert "the log was deleted" in _only_problem(log_path)


def test_a_writer_does_not_paper_over_a_truncated_log(log_path: Path) -> None:
    log_path.write_text("".join(_lines(log_path)[:7]))
    with PredictionLog(log_path) as log:
        stored = log.append(_record(11))
    # The chain continues from the head (seq 10), so the gap stays visible.
    assert stored["seq"] == 11
    assert "line 8: seq 11 where 8 was expected" in _only_problem(log_path)


def _torn(line: str, keep: int = 57) -> str:
    """The start of a record line, as a writer killed mid-write leaves it."""
    return line[:keep]


def _note(lines: str, follows: str) -> str:
    return (
        f"{lines}: the start of a record whose write was interrupted (a writer stopped "
        f"mid-write); {follows}, and the chain continues intact around them"
    )


def test_a_writer_continues_after_an_interrupted_write(log_path: Path) -> None:
    lines = _lines(log_path)
    with log_path.open("a") as stream:
        stream.write(_torn(lines[-1]))  # killed mid-line, before its fsync returned
    result = verify_log(log_path)
    assert result.ok and result.notes == [_note("line 11", "no record follows them yet")]

    with PredictionLog(log_path) as log:
        stored = log.append(_record(11))
    # The chain goes on from seq 10, and seq 11 commits to what the crash left before it.
    assert stored["seq"] == 11 and stored["prev_hash"] == json.loads(lines[-1])["hash"]
    assert stored["after_interrupted_write"]["lines"] == 1
    result = verify_log(log_path)
    assert result.ok, result.problems
    assert result.records == 11 and result.notes == [_note("line 11", "seq 11 records them")]
    with PredictionLog(log_path) as log:
        assert "after_interrupted_write" not in log.append(_record(12))  # only the first


def test_a_writer_killed_twice_in_a_row_is_told_apart_from_tampering(log_path: Path) -> None:
    lines = _lines(log_path)
    with log_path.open("a") as stream:
        # The second writer dies inside its first write too: its newline, then a piece.
        stream.write(_torn(lines[-1]) + "\n" + _torn(lines[-2], 90))
    behind = {"hash": json.loads(lines[-2])["hash"], "seq": 9}  # the head lags the records
    head_path_for(log_path).write_text(json.dumps(behind, separators=(",", ":")))
    with PredictionLog(log_path) as log:
        assert log.append(_record(11))["seq"] == 11  # from the last record, not the head
    result = verify_log(log_path)
    assert result.ok, result.problems
    assert result.notes == [_note("lines 11-12", "seq 11 records them")]


def test_a_record_cut_just_before_its_newline_is_whole(log_path: Path) -> None:
    lines = _lines(log_path)
    log_path.write_text("".join(lines)[:-1])
    behind = {"hash": json.loads(lines[-2])["hash"], "seq": 9}  # its fsync never returned
    head_path_for(log_path).write_text(json.dumps(behind, separators=(",", ":")))
    with PredictionLog(log_path) as log:
        stored = log.append(_record(11))
    assert stored["seq"] == 11 and "after_interrupted_write" not in stored
    result = verify_log(log_path)
    assert (result.ok, result.records, result.notes) == (True, 11, []), result.problems


def _crash_then_append(log_path: Path) -> None:
    """A writer killed inside seq 11's line, then the next writer's seq 11."""
    with log_path.open("a") as stream:
        stream.write(_torn(_lines(log_path)[-1]))
    with PredictionLog(log_path) as log:
        log.append(_record(11))


def test_audit_verify_passes_an_interrupted_write_with_a_note(log_path: Path) -> None:
    _crash_then_append(log_path)
    result = CliRunner().invoke(app, ["audit", "verify", "--log", str(log_path)])
    assert result.exit_code == 0, result.output
    note, intact = result.stdout.splitlines()
    assert note == f"{log_path}: note: {_note('line 11', 'seq 11 records them')}"
    assert intact.startswith(f"prediction log {log_path}: 11 records, hash chain intact; head 11:")


def test_a_cut_last_record_is_a_cut_not_an_interrupted_write(log_path: Path) -> None:
    lines = _lines(log_path)
    log_path.write_text("".join(lines[:-1]) + _torn(lines[-1], 40))  # the head names seq 10
    result = verify_log(log_path)
    assert result.problems == [
        "predictions.jsonl.head.json records seq 10 but the last record is seq 9: "
        "records were removed from the end of the log"
    ]


@pytest.mark.parametrize(
    ("tamper", "problems"),
    [
        # Seq 5, answered long ago, cut to the start of a record.
        (lambda lines: lines.__setitem__(4, _torn(lines[4]) + "\n"), ["line 5: not JSON"]),
        # Text planted between two records, looking like what a crash leaves.
        (
            lambda lines: lines.insert(4, '{"request_id": "req-2", "patient": "Jane Doe\n'),
            ["line 5: not JSON"],
        ),
        (lambda lines: lines.append("patient Jane Doe"), ["line 11: not JSON"]),
    ],
    ids=["cut record", "planted start of a record", "planted text at the end"],
)
def test_lines_no_crash_left_stay_problems(log_path: Path, tamper, problems: list[str]) -> None:
    lines = _lines(log_path)
    tamper(lines)
    log_path.write_text("".join(lines))
    result = verify_log(log_path)
    assert result.problems[: len(problems)] == problems and result.notes == []


def test_a_crash_s_lines_changed_after_the_next_record_are_a_problem(log_path: Path) -> None:
    _crash_then_append(log_path)
    lines = _lines(log_path)
    for changed in ([*lines[:10], _torn(lines[9], 50) + "\n", lines[11]], [*lines[:10], lines[11]]):
        log_path.write_text("".join(changed))
        result = verify_log(log_path)
        assert result.notes == [] and any(
            "records lines left by an interrupted write that the lines before it are not" in problem
            for problem in result.problems
        ), result.problems


def test_append_async_group_commits_concurrent_callers(tmp_path: Path) -> None:
    path = tmp_path / "async.jsonl"

    async def main(log: PredictionLog) -> list[dict]:
        return await asyncio.gather(*(log.append_async(_record(n)) for n in range(200)))

    with PredictionLog(path) as log:
        stored = asyncio.run(main(log))
        assert log.records_written == 200
        assert 1 <= log.commits < 200
    assert sorted(line["seq"] for line in stored) == list(range(1, 201))
    assert {line["request_id"] for line in stored} == {f"req-{n}" for n in range(200)}
    result = verify_log(path)
    assert result.ok, result.problems
    assert result.records == 200


def test_append_async_sustains_2000_records_per_second(tmp_path: Path) -> None:
    records = [_record(n) for n in range(64 * 50)]

    async def caller(log: PredictionLog, mine: list[PredictionRecord]) -> None:
        for record in mine:
            await log.append_async(record)

    async def main(log: PredictionLog) -> float:
        start = time.perf_counter()
        await asyncio.gather(*(caller(log, records[index::64]) for index in range(64)))
        return len(records) / (time.perf_counter() - start)

    with PredictionLog(tmp_path / "rate.jsonl") as log:
        rate = asyncio.run(main(log))
    assert rate > 2000, f"{rate:.0f} records/s"
    assert verify_log(tmp_path / "rate.jsonl").records == len(records)


def test_a_cancelled_caller_still_gets_its_record_written(tmp_path: Path) -> None:
    path = tmp_path / "cancel.jsonl"

    async def main(log: PredictionLog) -> None:
        task = asyncio.create_task(log.append_async(_record(1)))
        await asyncio.sleep(0)
        task.cancel()
        await log.append_async(_record(2))

    with PredictionLog(path) as log:
        asyncio.run(main(log))
    assert verify_log(path).records == 2


def _append_from_process(path: str, hospital: str, count: int) -> None:
    async def main(log: PredictionLog) -> None:
        await asyncio.gather(*(log.append_async(_record(n, hospital)) for n in range(count // 2)))

    with PredictionLog(Path(path)) as log:
        asyncio.run(main(log))
        for number in range(count // 2, count):
            log.append(_record(number, hospital))


def test_two_processes_appending_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_append_from_process, args=(str(path), hospital, 150))
        for hospital in ("Hospital A", "Hospital B")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    result = verify_log(path)
    assert result.ok, result.problems
    assert result.records == 300
    hospitals = [json.loads(line)["hospital"] for line in _lines(path)]
    assert hospitals.count("Hospital A") == hospitals.count("Hospital B") == 150


def test_a_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "closed.jsonl")
    log.close()
    log.close()
    with pytest.raises(PredictionLogError, match="closed"):
        log.append(_record(1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patient_id": "P-123"}, "Extra inputs are not permitted"),
        ({"patient_name": "Jane Doe"}, "Extra inputs are not permitted"),
        ({"score": None}, "needs score"),
        ({"model_version": None}, "needs model_version"),
        ({"score": float("nan")}, "finite number"),
        ({"status": 500}, "2xx status"),
        ({"hospital": "St Mary\nJane Doe"}, "not a valid name"),
        ({"summary": {"note": "patient Jane Doe, born 1970-01-01, ward 4"}}, "short label"),
        ({"request_id": "req 1 for Jane"}, "should match pattern"),
    ],
)
def test_the_record_schema_refuses_what_does_not_belong(changes: dict, message: str) -> None:
    fields = _record(1).model_dump() | changes
    with pytest.raises(ValidationError, match=message):
        PredictionRecord(**fields)


def test_a_failed_record_needs_an_error_and_no_score() -> None:
    fields = _failure(1).model_dump()
    with pytest.raises(ValidationError, match="needs error"):
        PredictionRecord(**(fields | {"error": None}))
    with pytest.raises(ValidationError, match="may not carry score"):
        PredictionRecord(**(fields | {"score": 0.9}))
    assert PredictionRecord(**fields).time.endswith("Z")


def test_audit_verify_exit_codes(log_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    intact = runner.invoke(app, ["audit", "verify", "--log", str(log_path)])
    assert intact.exit_code == 0, intact.output
    last = json.loads(_lines(log_path)[-1])
    assert intact.stdout.strip() == (
        f"prediction log {log_path}: 10 records, hash chain intact; head 10:{last['hash']}"
    )

    lines = _lines(log_path)
    del lines[4]
    log_path.write_text("".join(lines))
    broken = runner.invoke(app, ["audit", "verify", "--log", str(log_path)])
    assert broken.exit_code == 1
    assert broken.stdout.splitlines() == [
        f"{log_path}: {problem}" for problem in verify_log(log_path).problems
    ]

    directory = runner.invoke(app, ["audit", "verify", "--log", str(tmp_path)])
    assert directory.exit_code == 2
    assert (
        directory.stderr.strip() == f"error: --log: {tmp_path} is a directory, not a prediction log"
    )
    mistyped = runner.invoke(app, ["audit", "verify", "--log", str(tmp_path / "typo.jsonl")])
    assert mistyped.exit_code == 2 and "no such prediction log" in mistyped.stderr

    # Nested too deeply for the JSON parser: a problem on its line, not a traceback.
    log_path.write_text("".join(lines[:2]) + "[" * 100_000 + "\n")
    deep = runner.invoke(app, ["audit", "verify", "--log", str(log_path)])
    assert deep.exit_code == 1 and f"{log_path}: line 3: not JSON" in deep.stdout


def test_audit_verify_defaults_to_the_state_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MEDSCREEN_PREDICTION_LOG", raising=False)
    with PredictionLog(tmp_path / "serving" / "predictions.jsonl") as log:
        log.append(_record(1))
    result = CliRunner().invoke(app, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "1 records, hash chain intact" in result.stdout


def test_a_lagging_head_is_accepted_and_close_brings_it_up_to_date(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(path, head_interval_seconds=3600)
    for number in range(5):
        log.append(_record(number))
    head = json.loads(head_path_for(path).read_text())
    assert head["seq"] == 1  # written with the first commit only
    assert verify_log(path).ok
    log.close()
    assert json.loads(head_path_for(path).read_text())["seq"] == 5
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # delete the last record
    assert not verify_log(path).ok


def test_a_failed_fsync_leaves_no_record_behind(tmp_path: Path, monkeypatch) -> None:
    """A caller refused because its record is not durable must not appear in the log."""
    log = PredictionLog(tmp_path / "predictions.jsonl")
    log.append(_record(1))
    real_fsync, calls = os.fsync, itertools.count()

    def fsync_failing_once(descriptor: int) -> None:
        if next(calls) == 0:
            raise OSError(5, "Input/output error")
        real_fsync(descriptor)

    monkeypatch.setattr("serving.prediction_log.os.fsync", fsync_failing_once)
    with pytest.raises(PredictionLogError, match="Input/output error"):
        log.append(_record(2))
    log.append(_record(3))
    log.close()

    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ["req-1", "req-3"]
    assert [line["seq"] for line in lines] == [1, 2]
    assert verify_log(log.path).ok


def test_the_writer_brings_a_lagging_head_up_to_date_when_records_stop(tmp_path: Path):
    """Otherwise the last records of a burst could be cut off unnoticed while the log is idle."""
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(path, head_interval_seconds=0.3)

    async def burst() -> None:
        for number in range(3):  # one after another: the head is written with the first only
            await log.append_async(_record(number))

    asyncio.run(burst())
    assert json.loads(head_path_for(path).read_text())["seq"] == 1
    deadline = time.monotonic() + 5
    while json.loads(head_path_for(path).read_text())["seq"] != 3:
        assert time.monotonic() < deadline, "the head stayed behind while the log was idle"
        time.sleep(0.05)
    path.write_text("".join(_lines(path)[:1]))  # cut the last two records
    assert "records seq 3 but the last record is seq 1" in _only_problem(path)
    log.close()


def test_a_live_writer_keeps_the_gap_of_records_cut_behind_its_back(tmp_path: Path):
    path = tmp_path / "predictions.jsonl"
    with PredictionLog(path, head_interval_seconds=3600) as log:  # the head stays at seq 1
        for number in range(3):
            log.append(_record(number))
        path.write_text("".join(_lines(path)[:1]))  # records 2 and 3 deleted
        stored = log.append(_record(4))
    assert stored["seq"] == 4  # continues from its own last record, not from the file
    assert "line 2: seq 4 where 2 was expected" in _only_problem(path)


def test_a_line_whose_text_is_not_what_was_written_is_named(log_path: Path) -> None:
    lines = _lines(log_path)
    # A duplicate key in front: a JSON parser keeps the last value, so the hash still matches,
    # but whoever reads the text sees another decision and version.
    lines[0] = '{"decision":"negative","model_version":"7",' + lines[0][1:]
    log_path.write_text("".join(lines))
    assert _only_problem(log_path) == (
        "line 1 (seq 1): not the text the writer wrote (not canonical JSON)"
    )


def test_a_kept_head_catches_a_log_and_head_file_replaced_together(log_path: Path, tmp_path):
    runner = CliRunner()
    printed = runner.invoke(app, ["audit", "verify", "--log", str(log_path)]).stdout
    kept = printed.rsplit("head ", 1)[1].strip()
    again = runner.invoke(app, ["audit", "verify", "--log", str(log_path), "--expect-head", kept])
    assert again.exit_code == 0, again.output
    # Someone with write access regenerates a shorter, self-consistent log and its head file.
    head_path_for(log_path).unlink()
    log_path.unlink()
    with PredictionLog(log_path) as log:
        for number in range(3):
            log.append(_record(number))
    assert verify_log(log_path).ok  # the log alone cannot tell
    replaced = runner.invoke(
        app, ["audit", "verify", "--log", str(log_path), "--expect-head", kept]
    )
    assert replaced.exit_code == 1
    assert "the kept head records seq 10 but the last record is seq 3" in replaced.stdout
    # A longer forgery reaches the kept seq, but not with the kept hash.
    head_path_for(log_path).unlink()
    log_path.unlink()
    with PredictionLog(log_path) as log:
        for number in range(12):
            log.append(_record(number, hospital="Forged"))
    assert verify_log(log_path).ok
    forged = runner.invoke(app, ["audit", "verify", "--log", str(log_path), "--expect-head", kept])
    assert forged.exit_code == 1
    assert (
        "the kept head: the record with seq 10 does not have the hash the kept head records: "
        "the log was rewritten"
    ) in forged.stdout
    malformed = runner.invoke(
        app, ["audit", "verify", "--log", str(log_path), "--expect-head", "10:abc"]
    )
    assert malformed.exit_code == 2
    assert malformed.stderr.startswith("error: --expect-head: '10:abc' is not SEQ:HASH")


def test_a_writer_prefers_its_own_commit_over_another_workers_record_of_the_same_seq(
    tmp_path: Path,
):
    """Worker A's record 3 is cut and the head moved back; worker B then writes its own seq 3.

    Repeated: which of the two seq-3 hashes sorts higher is chance, and must not matter.
    """
    for attempt in range(8):
        path = tmp_path / f"predictions-{attempt}.jsonl"
        with PredictionLog(path) as worker_a, PredictionLog(path) as worker_b:
            for number in range(3):
                worker_a.append(_record(number))
            path.write_text("".join(_lines(path)[:2]))
            second = json.loads(_lines(path)[1])
            head_path_for(path).write_text(json.dumps({"seq": 2, "hash": second["hash"]}))
            assert worker_b.append(_record(10))["seq"] == 3
            assert worker_a.append(_record(11))["seq"] == 4
        # A chained on its own record 3, not on B's: the cut shows.
        problem = "line 4 (seq 4): prev_hash is not the previous record's hash"
        assert problem in _only_problem(path)


def test_a_missing_log_named_by_the_environment_or_state_dir_is_not_an_intact_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in the variable, or the wrong state dir, must not pass as "0 records, intact"."""
    runner = CliRunner()
    monkeypatch.setenv("MEDSCREEN_PREDICTION_LOG", str(tmp_path / "typo" / "predictions.jsonl"))
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'typo' / 'predictions.jsonl'}: no such prediction log (and no head "
        "file); the path is from $MEDSCREEN_PREDICTION_LOG"
    )
    monkeypatch.delenv("MEDSCREEN_PREDICTION_LOG")
    monkeypatch.setenv("MEDSCREEN_STATE_DIR", str(tmp_path / "elsewhere"))
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 2
    assert "no such prediction log" in result.stderr and "$MEDSCREEN_STATE_DIR" in result.stderr

    monkeypatch.setenv("MEDSCREEN_PREDICTION_LOG", str(tmp_path))
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path} is a directory, not a prediction log; the path is from "
        "$MEDSCREEN_PREDICTION_LOG"
    )


def test_an_empty_log_is_never_reported_intact(tmp_path: Path) -> None:
    """Emptied, its head file deleted, a log looks new: it must not pass as "0 records, intact"."""
    path = tmp_path / "predictions.jsonl"
    path.touch()
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "verify", "--log", str(path)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{path}: predictions.jsonl holds no records and predictions.jsonl.head.json is "
        "missing: a log emptied and its head file deleted cannot be told from a new one"
    ]
    assert "intact" not in result.stdout

    # With a head file naming records, an emptied log is records removed from the end.
    with PredictionLog(path) as log:
        for number in range(3):
            log.append(_record(number))
    path.write_bytes(b"")
    result = runner.invoke(app, ["audit", "verify", "--log", str(path)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{path}: predictions.jsonl.head.json records seq 3 but the last record is seq 0: "
        "records were removed from the end of the log"
    ]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_audit_verify_refuses_a_device_in_one_line(device: str) -> None:
    """/dev/zero never ends: read as a log, it grew to 9.4 GB in 15 s."""
    assert medscreen_error_line("audit", "verify", "--log", device) == (
        f"error: --log: {device} is a character device, not a prediction log"
    )


def test_audit_verify_refuses_a_named_pipe_and_survives_a_pipe_as_head_file(
    tmp_path: Path, log_path: Path
) -> None:
    """Opening a pipe blocks until someone writes to it: a planted one must not hang the check."""
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    assert medscreen_error_line("audit", "verify", "--log", str(pipe)) == (
        f"error: --log: {pipe} is a named pipe, not a prediction log"
    )
    head = head_path_for(log_path)
    head.unlink()
    os.mkfifo(head)
    assert verify_log(log_path).problems == [
        "predictions.jsonl.head.json: the head file is a named pipe, not a regular file"
    ]
    # The writer reads the head file too: it must go on appending, and replace the pipe.
    appended = threading.Thread(target=lambda: PredictionLog(log_path).append(_record(11)))
    appended.daemon = True
    appended.start()
    appended.join(timeout=30)
    assert not appended.is_alive(), "the writer hangs on a named pipe as head file"
    assert verify_log(log_path).ok and verify_log(log_path).records == 11


def test_a_head_file_too_long_to_be_one_is_not_read_whole(log_path: Path) -> None:
    head_path_for(log_path).write_bytes(b" " * 10_000_000 + b"{}")
    assert verify_log(log_path).problems == [
        "predictions.jsonl.head.json: the head file is longer than 4096 bytes"
    ]


def test_the_largest_record_the_schema_admits_is_far_below_the_line_limit(
    tmp_path: Path,
) -> None:
    """MAX_LINE_BYTES must never call a record the writer wrote too long."""
    largest = PredictionRecord(
        request_id="r" * 128,
        outcome="failed",
        status=599,
        route="/" + "a" * 127,
        hospital="H" * 64,
        region="R" * 64,
        key_id="0" * 12,
        model_name="m" * 128,
        model_version="v" * 64,
        model_alias="a" * 64,
        model_sha256="f" * 64,
        input_sha256="e" * 64,
        input_format="x" * 64,
        threshold=-1.2345678901234567e-300,
        # The largest int Python writes as JSON by default has 4300 digits.
        summary={f"{i:02d}" + "k" * 62: -int("9" * 4300) for i in range(64)},
        latency_ms=1.7976931348623157e308,
        error="\U0001f600" * 1000,  # 12 bytes each as ASCII JSON
    )
    path = tmp_path / "predictions.jsonl"
    with PredictionLog(path) as log:
        log.append(largest)
    assert 250_000 < path.stat().st_size < MAX_LINE_BYTES // 3
    assert verify_log(path).ok


def _verify_measuring_memory(log_path: Path) -> tuple[VerificationResult, int]:
    """Verify the log; return the result and the peak of Python memory allocated meanwhile."""
    tracemalloc.start()
    try:
        return verify_log(log_path), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_line_longer_than_any_record_is_named_without_reading_it_whole(
    log_path: Path,
) -> None:
    records = _lines(log_path)
    lines = records.copy()
    lines.insert(2, "x" * MAX_LINE_BYTES + "\n")  # as long as a line may be: merely not JSON
    lines.insert(3, "y" * (MAX_LINE_BYTES + 1) + "\n")
    log_path.write_text("".join(lines))
    # The rest of the log is still checked.
    assert verify_log(log_path).problems == [
        "line 3: not JSON",
        f"line 4: {MAX_LINE_BYTES + 1} bytes long, longer than any record (at most "
        f"{MAX_LINE_BYTES}): not a prediction log record",
    ]

    # 64 MiB without a newline at the end (a 300 MB one took 780 MB when read whole).
    log_path.write_text("".join(records))
    with log_path.open("r+b") as stream:
        stream.truncate(log_path.stat().st_size + (64 << 20))
    result, peak = _verify_measuring_memory(log_path)
    assert result.records == 10
    assert result.problems == [
        f"line 11: {64 << 20} bytes long, longer than any record (at most {MAX_LINE_BYTES}): "
        "not a prediction log record"
    ]
    assert peak < 8 << 20, f"verify held {peak} bytes"


def test_many_bad_lines_are_counted_not_held(log_path: Path) -> None:
    """Memory must not follow how many lines are not records either."""
    lines = _lines(log_path)
    junk = b'{"' + b"j" * 997 + b"\n"  # looks like the start of a record: kept for a while
    with log_path.open("wb") as stream:
        stream.write("".join(lines[:5]).encode())
        stream.write(junk * 20_000)
        stream.write("".join(lines[5:]).encode())
    result, peak = _verify_measuring_memory(log_path)
    assert result.records == 10
    assert len(result.problems) == 10_001
    assert result.problems[:2] == ["line 6: not JSON", "line 7: not JSON"]
    assert result.problems[-1] == (
        "10000 more problems of lines up to line 20005, not listed (the first 10000 are)"
    )
    assert peak < 8 << 20, f"verify held {peak} bytes"


def test_a_record_claiming_a_crash_that_left_nothing_is_a_problem(tmp_path: Path) -> None:
    """Forged, such a record made `audit verify` crash with an IndexError."""
    path = tmp_path / "predictions.jsonl"
    with PredictionLog(path) as log:
        log.append(_record(1))
    record = json.loads(path.read_text())
    record.pop("hash")
    record[INTERRUPTED_WRITE_FIELD] = {"lines": 1, "sha256": hashlib.sha256(b"").hexdigest()}
    record["hash"] = chain_hash(GENESIS_HASH, record)
    path.write_text(canonical_json(record) + "\n")
    head_path_for(path).write_text(json.dumps({"seq": 1, "hash": record["hash"]}))
    result = CliRunner().invoke(app, ["audit", "verify", "--log", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines() == [
        f"{path}: line 1 (seq 1): it records lines left by an interrupted write that the lines "
        "before it are not: lines were inserted, removed or changed"
    ]
