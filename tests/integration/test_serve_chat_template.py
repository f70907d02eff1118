"""`fleetserve serve --chat-template FILE` against a real server: the file's template renders the chat
prompts (prompt tokens match the custom rendering, not the model's own), and a file that is missing or
does not render fails the start with a message naming it — before serving anything."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, hf, server_factory, tiny_model  # noqa: F401 - fixtures
from serve_util import openai_client as client

PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_the_files_template_renders_the_prompt(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                               tmp_path: Path, hf) -> None:  # noqa: F811
    _, tok = hf
    path = tmp_path / "plain.jinja"
    path.write_text(PLAIN)
    proc = server_factory("--chat-template", str(path))
    r = client(proc).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    custom = tok.apply_chat_template(MESSAGES, chat_template=PLAIN, tokenize=False, add_generation_prompt=True)
    own = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert custom != own
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tok.encode(custom, add_special_tokens=False))


@pytest.mark.parametrize("content,expected", [
    (None, "cannot read it"),
    ("{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}", "does not render a sample conversation"),
])
def test_a_bad_template_fails_the_start_naming_the_file(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                                        tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "bad.jinja"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RuntimeError, match="exited with code 1") as failure:
        server_factory("--chat-template", str(path))
    assert f"--chat-template {path}" in str(failure.value)
    assert expected in str(failure.value)
