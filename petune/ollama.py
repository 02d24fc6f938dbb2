"""An Ollama ``Modelfile`` for an exported GGUF: the run's chat template in Ollama's Go
template syntax, its stop tokens and default parameters.

Jinja cannot be translated to Go templates in general, so the run's template is recognised
by what it renders: each layout below renders the same probe conversations in Python, and the
first whose renderings equal the tokenizer's own (with the run's end-of-turn token) gives its
Go template, written by hand for that layout. An unrecognised template is said, and the
Modelfile then leaves the template to Ollama, which reads the GGUF's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Probe conversations: a system message, one and two user turns, and an answered turn.
PROBES = (
    [{"role": "user", "content": "U1"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
    [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}],
)


@dataclass(frozen=True)
class Layout:
    name: str
    render: Callable[[list[dict], str], str]  # (messages, end of turn) -> prompt, no BOS, generation prompt added
    go: Callable[[str], str]  # end of turn -> Ollama template (Ollama adds BOS itself, as llama.cpp does)


def _chatml(messages, end):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{end}\n" for m in messages)
    return text + "<|im_start|>assistant\n"


def _chatml_go(end):
    return ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}" + end + "\n{{ end }}"
            "<|im_start|>assistant\n")


def _gemma(messages, end):
    text, system = "", ""
    for i, m in enumerate(messages):
        following = messages[i + 1]["role"] if i + 1 < len(messages) else ""
        if m["role"] == "system" and following == "user":
            system += m["content"] + "\n\n"
            continue
        role = "model" if m["role"] == "assistant" else "user"
        text += f"<start_of_turn>{role}\n{system if role == 'user' else ''}{m['content']}{end}\n"
        if role == "user":
            system = ""
    return text + "<start_of_turn>model\n"


def _gemma_go(end):
    # a system message is put at the start of the next user turn, as the run's template does.
    # No {{- trims here: they would also eat the newlines the layout needs.
    return ('{{ $system := "" }}{{ range .Messages }}'
            '{{ if eq .Role "system" }}{{ $system = printf "%s%s\\n\\n" $system .Content }}'
            '{{ else if eq .Role "user" }}<start_of_turn>user\n{{ $system }}{{ .Content }}' + end + '\n'
            '{{ $system = "" }}'
            '{{ else }}<start_of_turn>model\n{{ .Content }}' + end + '\n{{ end }}'
            '{{ end }}<start_of_turn>model\n')


_ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n")


def _alpaca(messages, end):
    text = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else _ALPACA_PREAMBLE
    for i, m in enumerate(messages):
        if m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n"
        elif m["role"] == "assistant":
            text += f"### Response:\n{m['content']}{end}\n\n"
        elif i:
            text += m["content"] + "\n\n"
    return text + "### Response:\n"


def _alpaca_go(end):
    return ('{{ if .System }}{{ .System }}\n\n{{ else }}' + _ALPACA_PREAMBLE + '{{ end }}'
            '{{ range .Messages }}{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
            '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}' + end + '\n\n{{ end }}{{ end }}'
            '### Response:\n')


def _llama3(messages, end):
    text = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}{end}" for m in messages)
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama3_go(end):
    return ("{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}" + end +
            "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


LAYOUTS = (Layout("chatml", _chatml, _chatml_go), Layout("gemma", _gemma, _gemma_go),
           Layout("alpaca", _alpaca, _alpaca_go), Layout("llama3", _llama3, _llama3_go))


def recognise(tokenizer, end_tokens: list[str]) -> tuple[Layout, str] | None:
    """The layout (and its end-of-turn token) whose renderings equal the run's template's."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    bos = tokenizer.bos_token or ""
    try:
        rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROBES]
    except Exception:  # noqa: BLE001 - a template may refuse a probe (e.g. no system role): then it is not one of these
        return None
    rendered = [r[len(bos):] if bos and r.startswith(bos) else r for r in rendered]
    for layout in LAYOUTS:
        for end in dict.fromkeys([*end_tokens, tokenizer.eos_token or ""]):
            if end and all(layout.render(list(p), end) == r for p, r in zip(PROBES, rendered)):
                return layout, end
    return None


def modelfile(gguf_path: Path, tokenizer, stop_tokens: list[str], config) -> tuple[str, list[str]]:
    """The Modelfile text and notes for the user."""
    notes = []
    lines = [f"# written by petune export; create the model with: ollama create NAME -f {gguf_path.parent / 'Modelfile'}",
             f"FROM ./{gguf_path.name}"]
    found = recognise(tokenizer, stop_tokens)
    if found is None:
        notes.append("the run's chat template is not one petune can translate to Ollama's syntax (chatml, gemma, "
                     "alpaca, llama3); the Modelfile has no TEMPLATE, so Ollama uses the GGUF's own metadata")
    else:
        layout, end = found
        lines.append(f"# chat template: {layout.name} layout, answers end with {end}")
        lines.append(f'TEMPLATE """{layout.go(end)}"""')
    stops = list(dict.fromkeys([*stop_tokens, *([found[1]] if found else []), tokenizer.eos_token or ""]))
    for stop in stops:
        if stop:
            lines.append(f"PARAMETER stop {json.dumps(stop)}")
    context = int(getattr(config, "max_position_embeddings", 0) or 4096)
    lines.append("# greedy, as `petune generate` answers by default; raise it for more varied answers")
    lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER num_ctx {min(context, 8192)}")
    return "\n".join(lines) + "\n", notes
