"""Record formats: one record (a dict, from any file kind) -> (token ids, carries loss) pieces.

  chat               OpenAI chat fine-tuning format: {"messages": [...], "tools": [...] (optional)}
  sharegpt           {"conversations": [{"from": "human|gpt|system|tool|function_call|observation",
                     "value": ...}], "system": ... (optional), "tools": ... (optional)}
  prompt_completion  {"prompt": ..., "completion": ...}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  text               {"text": ...}

Both conversation formats become one `Conversation` first, so the same dialogue given as OpenAI
messages or as ShareGPT turns renders to the same tokens. A real model with a chat template renders
it with its template; the builtins (byte tokenizer, no template) use a plain, deterministic rendering:
a `tools: [...]` line, then one `role: content` line per turn, tool calls as `<tool_call>{...}</tool_call>`.
Only assistant turns with weight 1 carry loss (with `loss_on: completion`); tool outputs never do.

Every error names where the record is (`file:line` or `file: row N`) and the field.
"""

from __future__ import annotations

import json
from muxtune.errors import MuxTuneError
from muxtune.executor.chat_render import Conversation, ToolCall, Turn, render_pieces

FORMATS = ("chat", "sharegpt", "prompt_completion", "alpaca", "text")
FORMAT_KEYS = {"chat": {"messages"}, "sharegpt": {"conversations"}, "prompt_completion": {"prompt", "completion"},
               "alpaca": {"instruction", "output"}, "text": {"text"}}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

def detect(record: dict, where: str) -> str:
    for fmt, keys in FORMAT_KEYS.items():
        if keys & set(record):
            return fmt
    raise MuxTuneError(f"{where}: cannot tell the data format from keys {sorted(record)}; expected "
                       "'messages' (chat), 'conversations' (sharegpt), 'prompt'/'completion', "
                       "'instruction'/'input'/'output' (alpaca) or 'text' (or set data_format)")


def pieces(record: dict, fmt: str, tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """The record as (token ids, carries loss with loss_on: completion) pieces in order."""
    if not FORMAT_KEYS[fmt] & set(record):
        raise MuxTuneError(f"{where}: expected a {fmt} record (keys {sorted(FORMAT_KEYS[fmt])}), got keys "
                           f"{sorted(record)}; a file holds one format")
    if fmt == "text":
        return [(tokenizer.encode(_str_field(record, "text", where)), True)]
    if fmt == "prompt_completion":
        return [(tokenizer.encode(_str_field(record, "prompt", where)), False),
                (tokenizer.encode(_str_field(record, "completion", where)), True)]
    if fmt == "alpaca":
        instruction = _str_field(record, "instruction", where)
        extra = _str_field(record, "input", where) if record.get("input") is not None else ""
        prompt = (ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT).format(instruction=instruction, input=extra)
        return [(tokenizer.encode(prompt), False), (tokenizer.encode(_str_field(record, "output", where)), True)]
    conversation = openai_conversation(record, where) if fmt == "chat" else sharegpt_conversation(record, where)
    if not any(turn.trains for turn in conversation.turns):
        key = "messages" if fmt == "chat" else "conversations"
        if any(turn.role == "assistant" for turn in conversation.turns):
            raise MuxTuneError(f"{where}: {key} has no 'assistant' turn to train on (every one has weight 0)")
        raise MuxTuneError(f"{where}: {key} has no 'assistant' turn to train on")
    return render_pieces(conversation, tokenizer, where)


def _str_field(record: dict, key: str, where: str) -> str:
    if key not in record or record[key] is None:
        raise MuxTuneError(f"{where}: missing '{key}'")
    if not isinstance(record[key], str):
        raise MuxTuneError(f"{where}: '{key}' must be a string")
    return record[key]


# --- OpenAI chat fine-tuning format ----------------------------------------------------------------

MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "weight", "tool_calls", "function_call", "refusal"},
    "tool": {"role", "content", "tool_call_id", "name"},
    "function": {"role", "content", "name"},  # legacy: a function's result, answering function_call
}
ROLES = "system, developer, user, assistant, tool or function"


def openai_conversation(record: dict, where: str) -> Conversation:
    """Check a record against the OpenAI chat fine-tuning format's rules and read it. A null field
    counts as absent (columnar files such as Parquet hold every key of every row)."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MuxTuneError(f"{where}: 'messages' must be a non-empty list")
    tools = _tools(record.get("tools"), "tools", where)
    if record.get("functions") is not None:  # legacy top-level function list
        tools += [{"type": "function", "function": f} for f in _function_list(record["functions"], where)]
    turns, call_ids = [], set()
    for i, raw in enumerate(messages):
        message = {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in MESSAGE_KEYS:
            got = "not an object" if not isinstance(message, dict) else f"'role' is {role!r}"
            raise MuxTuneError(f"{where}: messages[{i}] must be a message with a role in {ROLES}: {got}")
        bad = f"{where}: messages[{i}] must be a valid {role} message:"
        unknown = sorted(set(message) - MESSAGE_KEYS[role])
        if unknown:
            raise MuxTuneError(f"{bad} unknown key '{unknown[0]}' (allowed: {', '.join(sorted(MESSAGE_KEYS[role]))})")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise MuxTuneError(f"{bad} 'name' must be a string")
        if role == "assistant":
            turns.append(_assistant_turn(message, bad, call_ids))
            continue
        content = _content(message, bad)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise MuxTuneError(f"{bad} 'tool_call_id' must be a string naming an earlier tool call")
            if call_id not in call_ids:
                raise MuxTuneError(f"{bad} 'tool_call_id' {call_id!r} answers no earlier assistant tool call")
            turns.append(Turn("tool", content, name=name, tool_call_id=call_id))
        elif role == "function":
            if name is None:
                raise MuxTuneError(f"{bad} 'name' (the function whose result this is) is missing")
            turns.append(Turn("tool", content, name=name))
        else:  # a developer message is the newer name of the system message
            turns.append(Turn("system" if role == "developer" else role, content, name=name))
    return Conversation(turns, tools)


def _assistant_turn(message: dict, bad: str, call_ids: set) -> Turn:
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise MuxTuneError(f"{bad} 'weight' must be 0 or 1, got {weight!r}")
    calls = []
    if "tool_calls" in message and "function_call" in message:
        raise MuxTuneError(f"{bad} has both 'tool_calls' and the legacy 'function_call'; use one")
    if "tool_calls" in message:
        raw_calls = message["tool_calls"]
        if not isinstance(raw_calls, list) or not raw_calls:
            raise MuxTuneError(f"{bad} 'tool_calls' must be a non-empty list")
        for j, raw in enumerate(raw_calls):
            call = {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else None
            if call is None or not isinstance(call.get("function"), dict):
                raise MuxTuneError(f"{bad} 'tool_calls[{j}]' must be {{'id': ..., 'type': 'function', "
                                   "'function': {'name': ..., 'arguments': ...}}")
            if call.get("type", "function") != "function":
                raise MuxTuneError(f"{bad} 'tool_calls[{j}].type' must be 'function', got {call['type']!r}")
            if not isinstance(call.get("id"), str):
                raise MuxTuneError(f"{bad} 'tool_calls[{j}].id' must be a string (tool messages answer it)")
            calls.append(_call(call["function"], f"tool_calls[{j}].function", bad, call["id"]))
            call_ids.add(call["id"])
    elif "function_call" in message:  # legacy: one call, answered by a `function` message
        if not isinstance(message["function_call"], dict):
            raise MuxTuneError(f"{bad} 'function_call' must be {{'name': ..., 'arguments': ...}}")
        calls.append(_call(message["function_call"], "function_call", bad, None))
    if "content" not in message and calls:
        content = ""  # a turn that only calls tools has no content
    else:
        content = _content(message, bad)
    return Turn("assistant", content, trains=weight == 1, name=message.get("name"), tool_calls=calls)


def _call(function: dict, key: str, bad: str, call_id: str | None) -> ToolCall:
    function = {k: v for k, v in function.items() if v is not None}
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise MuxTuneError(f"{bad} '{key}.name' must be a non-empty string")
    return ToolCall(function["name"], _arguments(function.get("arguments", {}), f"{key}.arguments", bad), call_id)


def _arguments(arguments, key: str, bad: str):
    """The format sends arguments as a JSON-encoded string; templates want the object."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise MuxTuneError(f"{bad} '{key}' must be a JSON-encoded object: {exc.msg}") from None
    if isinstance(arguments, dict):
        return arguments
    raise MuxTuneError(f"{bad} '{key}' must be a JSON-encoded string, got {type(arguments).__name__}")


def _content(message: dict, bad: str) -> str:
    """A string, or a list of text parts (the format allows both); other parts cannot be trained here."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MuxTuneError(f"{bad} 'content[{j}]' must be a text part {{'type': 'text', 'text': str}} "
                                   "(images and audio cannot be trained on a text backbone)")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        raise MuxTuneError(f"{bad} 'content' is missing")
    raise MuxTuneError(f"{bad} 'content' must be a string (or a list of text parts), got {type(content).__name__}")


def _tools(tools, key: str, where: str) -> list[dict]:
    """A top-level tool list in OpenAI form; bare function definitions (LLaMA-Factory) are wrapped, and a
    JSON string (how CSV and many Parquet files hold it) is parsed."""
    if tools is None or tools == "":
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise MuxTuneError(f"{where}: '{key}' is a string but not JSON: {exc.msg}") from None
    if not isinstance(tools, list):
        raise MuxTuneError(f"{where}: '{key}' must be a list of tools")
    out = []
    for j, tool in enumerate(tools):
        if isinstance(tool, dict) and "function" in tool:
            if tool.get("type", "function") != "function" or not isinstance(tool["function"], dict):
                raise MuxTuneError(f"{where}: '{key}[{j}]' must be {{'type': 'function', 'function': {{...}}}}")
            function = tool["function"]
        else:
            function = tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise MuxTuneError(f"{where}: '{key}[{j}]' must be a function definition with a 'name'")
        out.append({"type": "function", "function": _without_nulls(function)})
    return out


def _function_list(functions, where: str) -> list[dict]:
    if not isinstance(functions, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                                  for f in functions):
        raise MuxTuneError(f"{where}: 'functions' must be a list of function definitions with a 'name'")
    return functions


def _without_nulls(value):
    """Columnar files give every row every key (null where absent): drop them so a tool's schema reads
    the same from Parquet as from JSONL."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# --- ShareGPT (as axolotl and LLaMA-Factory read it) -----------------------------------------------

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}


def sharegpt_conversation(record: dict, where: str) -> Conversation:
    turns_in = record.get("conversations")
    if not isinstance(turns_in, list) or not turns_in:
        raise MuxTuneError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    system = record.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            raise MuxTuneError(f"{where}: 'system' must be a string")
        turns.append(Turn("system", system))
    for i, turn in enumerate(turns_in):
        source = turn.get("from") if isinstance(turn, dict) else None
        if not isinstance(source, str) or source not in SHAREGPT_ROLES:
            got = "not an object" if not isinstance(turn, dict) else f"'from' is {source!r}"
            raise MuxTuneError(f"{where}: conversations[{i}] must be a turn with 'from' in "
                               f"{', '.join(SHAREGPT_ROLES)}: {got}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise MuxTuneError(f"{where}: conversations[{i}] must be a valid {source} turn: 'value' must be a "
                               f"string, got {type(value).__name__}")
        role = SHAREGPT_ROLES[source]
        if source == "function_call":  # LLaMA-Factory: the value is the JSON call (or a list of calls)
            bad = f"{where}: conversations[{i}] must be a valid function_call turn:"
            try:
                calls = json.loads(value)
            except json.JSONDecodeError as exc:
                raise MuxTuneError(f"{bad} 'value' must be a JSON call {{'name': ..., 'arguments': ...}}: "
                                   f"{exc.msg}") from None
            calls = calls if isinstance(calls, list) else [calls]
            if not calls or not all(isinstance(c, dict) for c in calls):
                raise MuxTuneError(f"{bad} 'value' must be a JSON call {{'name': ..., 'arguments': ...}}")
            turns.append(Turn("assistant", "", trains=True,
                              tool_calls=[_call(c, "value", bad, None) for c in calls]))
        else:
            turns.append(Turn(role, value, trains=role == "assistant"))
    return Conversation(turns, _tools(record.get("tools"), "tools", where))
