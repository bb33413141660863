"""The run's coordinator log (server/run_log.py), without processes: server.log is appended to
across starts (never truncated), plain text, each line once; a resumed start first copies what
the killed one had not; the SuperLink's gRPC line on a plaintext client is said in words."""

from __future__ import annotations

from pathlib import Path

from fedtune.server.run_log import HEADER, HandshakeWatch, RunLogFile

COLOURED = "\x1b[92mINFO \x1b[0m:      [ROUND 1]\n"


def _flwr_log(text: str) -> str:
    """As `flwr log --show` prints it: a line of its own first, one extra newline at the end."""
    return "Using SuperLink: fedtune (127.0.0.1:8000)\n" + text + "\n"


def test_server_log_is_appended_across_starts_plain_and_complete(tmp_path: Path):
    path = tmp_path / "server.log"
    first = RunLogFile(path, 11)
    assert first.sync(_flwr_log("INFO : start\n" + COLOURED + "INFO : half a li")) == 2
    # killed here; the resumed start copies the rest of run 11 from the SuperLink, then its own
    prev = RunLogFile.last_in(path)
    assert prev is not None and prev.flower_run_id == 11
    assert prev.sync(_flwr_log("INFO : start\n" + COLOURED + "INFO : half a line\n[ROUND 2]\n"),
                     final=True) == 2
    RunLogFile(path, 12, "resumed: rounds 1..1 completed before").sync(
        _flwr_log("[RESUME] continuing at round 2\n"), final=True)
    text = path.read_text()
    assert "\x1b[" not in text and "Using SuperLink" not in text
    lines = text.splitlines()
    assert [x for x in lines if not x.startswith(HEADER)] == [
        "INFO : start", "INFO :      [ROUND 1]", "INFO : half a line", "[ROUND 2]",
        "[RESUME] continuing at round 2"]
    assert lines[0].startswith(HEADER) and lines[0].endswith("Flower run 11 ====")
    assert "Flower run 12 (resumed: rounds 1..1 completed before)" in lines[5]


def test_plaintext_handshakes_in_the_superlink_log_are_said_once_a_minute(tmp_path: Path):
    log = tmp_path / "superlink.log"
    log.write_text("from an earlier start: Handshake failed with error SSL_ERROR_SSL: "
                   "error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER\n")
    said: list[str] = []
    watch = HandshakeWatch(log, said.append, "0.0.0.0:9092")
    line = ("I1203 12:31:32.470595 18337 ssl_transport_security.cc:2563] Handshake failed with "
            "error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
            "WRONG_VERSION_NUMBER: Invalid certificate verification context\n")
    with open(log, "a") as fh:
        fh.write(line * 3)
    watch.poll()
    assert len(said) == 1 and "refused 3 plaintext connection attempt(s)" in said[0]
    assert "--insecure" in said[0] and "0.0.0.0:9092" in said[0]
    with open(log, "a") as fh:
        fh.write(line)
    watch.poll()
    assert len(said) == 1  # counted, said at most once a minute
