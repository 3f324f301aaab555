"""The README's usage example runs as written against a real server with the built-in tiny model (the
one `scripts/serve.sh` serves), and prints what its comments promise."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from conftest import start_server, stop_server

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_example_runs_and_reuses_the_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    code = block.group(1)
    assert "http://127.0.0.1:8000" in code
    srv = start_server(["--model", str(tiny_model_dir)], tmp_path / "data")  # no keys: any key, as it says
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            # dont_inherit: this module's `from __future__ import annotations` must not reach the example
            exec(compile(code.replace("http://127.0.0.1:8000", srv.base_url), str(README), "exec", dont_inherit=True), {})
    finally:
        stop_server(srv)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    chat_cached, verdict, responses_cached = lines
    assert int(chat_cached) > 0 and int(responses_cached) > 0
    assert re.fullmatch(r"answer='(yes|no)' confidence=\d+", verdict)


