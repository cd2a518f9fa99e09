"""A conversation (read by executor/formats.py from OpenAI messages or ShareGPT) -> token pieces, each
marked whether it carries loss.

A real model with a chat template renders it with its template (tools passed as the template's
`tools`); the builtins, whose byte tokenizer has no template, use a plain, deterministic rendering:

    tools: [{"function": {...}, "type": "function"}]     (only when the record has tools)
    system: You are terse.
    user (ann): What is the weather in Oslo?
    assistant: <tool_call>{"arguments": {"city": "Oslo"}, "name": "weather"}</tool_call>
    tool: 3 C, rain
    assistant: Cold and wet.

Loss falls on an assistant turn's text after `assistant: ` (its content, tool calls and the newline)
where its weight is 1; never on a role prefix, a tool output or the tool list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from muxtune.errors import MuxTuneError

Pieces = list[tuple[list[int], bool]]  # (token ids, carries loss with loss_on: completion), in order


@dataclass
class ToolCall:
    name: str
    arguments: object  # parsed: the OpenAI format sends a JSON string, templates want the object
    id: str | None = None


@dataclass
class Turn:
    role: str  # system | user | assistant | tool
    content: str
    trains: bool = False  # an assistant turn with weight 1
    name: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None


@dataclass
class Conversation:
    turns: list[Turn]
    tools: list[dict] = field(default_factory=list)  # OpenAI form: {"type": "function", "function": {...}}


def render_pieces(conversation: Conversation, tokenizer, where: str) -> Pieces:
    inner = getattr(tokenizer, "tok", None)
    if inner is not None and getattr(inner, "chat_template", None):
        return _template_pieces(conversation, tokenizer, inner, where)
    return _plain_pieces(conversation, tokenizer)


# --- builtins: plain rendering ---------------------------------------------------------------------


def _plain_pieces(conversation: Conversation, tokenizer) -> Pieces:
    pieces = []
    if conversation.tools:
        pieces.append((tokenizer.encode(f"tools: {_json(conversation.tools)}\n"), False))
    for turn in conversation.turns:
        head = f"{turn.role} ({turn.name}): " if turn.name else f"{turn.role}: "
        pieces.append((tokenizer.encode(head), False))
        pieces.append((tokenizer.encode(_plain_body(turn) + "\n"), turn.trains))
    return pieces


def _plain_body(turn: Turn) -> str:
    calls = [f"<tool_call>{_json({'name': c.name, 'arguments': c.arguments})}</tool_call>" for c in turn.tool_calls]
    return "\n".join(([turn.content] if turn.content or not calls else []) + calls)


def _json(value) -> str:
    # sorted keys: the same tool or call reads the same from JSONL, Parquet or a saved dataset
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# --- a real model: its chat template ---------------------------------------------------------------


def _template_pieces(conversation: Conversation, tokenizer, inner, where: str) -> Pieces:
    """The model's own template renders the text; an assistant turn is the text the template adds after
    the conversation so far (rendered prefix by prefix, which works for any template). Tokenizing the
    whole text once and marking tokens by character offsets keeps the tokenizer's merges across turn
    boundaries exactly as the model sees them."""
    messages, trains_flags, tools = _template_messages(conversation, inner)
    full = _render(inner, messages, tools, False, where)
    spans = []
    for i, turn_trains in enumerate(trains_flags):
        if turn_trains:
            before = _render(inner, messages[:i], tools, True, where)
            after = _render(inner, messages[: i + 1], tools, False, where)
            if not (after.startswith(before) and full.startswith(after)):
                raise MuxTuneError(f"{where}: the model's chat template does not render this "
                                   "conversation prefix by prefix; use loss_on: all")
            spans.append((len(before), len(after)))
    encoded = inner(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if ids and ids[0] == tokenizer.bos_token_id:  # the template wrote bos itself; we add it anyway
        ids, offsets = ids[1:], offsets[1:]
    pieces = []
    for token, (lo, hi) in zip(ids, offsets):
        trains = any(lo < b and a < max(hi, lo + 1) for a, b in spans)  # overlaps a trained assistant turn
        if pieces and pieces[-1][1] == trains:
            pieces[-1][0].append(token)
        else:
            pieces.append(([token], trains))
    return pieces


def _template_messages(conversation: Conversation, inner) -> tuple[list[dict], list[bool], list[dict] | None]:
    """Messages as HF chat templates read them, whether each carries loss, and the tools. A template
    that never mentions tools would drop the tool list silently: then its plain rendering goes into
    the system message instead."""
    messages = [_template_message(turn) for turn in conversation.turns]
    trains = [turn.trains for turn in conversation.turns]
    tools = conversation.tools or None
    if tools and "tools" not in str(inner.chat_template):
        listing = f"tools: {_json(tools)}"
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{listing}\n{messages[0]['content']}"}
        else:
            messages.insert(0, {"role": "system", "content": listing})
            trains.insert(0, False)
        tools = None
    return messages, trains, tools


def _template_message(turn: Turn) -> dict:
    message = {"role": turn.role, "content": turn.content}
    if turn.name:
        message["name"] = turn.name
    if turn.tool_calls:
        message["tool_calls"] = [_template_call(c) for c in turn.tool_calls]
    if turn.tool_call_id:
        message["tool_call_id"] = turn.tool_call_id
    return message


def _template_call(call: ToolCall) -> dict:
    out = {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return {**out, "id": call.id} if call.id else out


def _render(tok, messages: list[dict], tools, generation_prompt: bool, where: str) -> str:
    if not messages:
        return ""
    try:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template raises its own errors (jinja's raise_exception, type errors)
        raise MuxTuneError(f"{where}: the model's chat template cannot render this conversation: {exc}") from None
