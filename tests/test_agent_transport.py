"""The agent's transport and credentials (issue 12): plain http:// only to this machine unless
--insecure, and the enrollment key from a file or PF_ENROLLMENT_KEY as well as the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.__main__ import check_transport, resolve_enrollment_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "https://fl.example"]
)
def test_loopback_and_https_are_allowed(url):
    check_transport(url, insecure=False)


@pytest.mark.parametrize("url", ["http://fl.example:8000", "http://10.0.0.5", "http://127.0.0.1.nip.io"])
def test_plain_http_elsewhere_needs_insecure(url):
    with pytest.raises(SystemExit, match="in the clear"):
        check_transport(url, insecure=False)
    check_transport(url, insecure=True)


def test_other_schemes_are_refused():
    with pytest.raises(SystemExit, match="expected an http"):
        check_transport("ftp://fl.example", insecure=True)


def test_the_key_comes_from_the_flag_then_the_file_then_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    env = {"PF_ENROLLMENT_KEY": "from-env"}
    assert resolve_enrollment_key("from-flag", key_file, env) == "from-flag"
    assert resolve_enrollment_key(None, key_file, env) == "from-file"
    assert resolve_enrollment_key(None, None, env) == "from-env"
    with pytest.raises(SystemExit, match="no enrollment key"):
        resolve_enrollment_key(None, None, {})
    with pytest.raises(SystemExit, match="empty"):
        (tmp_path / "empty").write_text("  \n")
        resolve_enrollment_key(None, tmp_path / "empty", {})
    with pytest.raises(SystemExit, match="enrollment-key-file"):
        resolve_enrollment_key(None, tmp_path / "missing", {})


def test_pf_agent_refuses_plain_http_to_another_machine(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "device_agent", "run", "--coordinator", "http://192.0.2.1:8000", "--data", "x"]
        + ["--state-dir", str(tmp_path), "--enrollment-key", "k"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode != 0 and "in the clear" in done.stderr
