"""R1's chat format in the tiny model's template (system prompts, tool definitions, assistant tool calls, tool
outputs) and function tools through the gateway: the official `openai` client against a real CPU Triton behind
`r1deploy gateway`, whole and streamed. The model's tool calls come from the scripted contract-speaking test model
(tests/data/scripted_generate/model.py: scripts `tool` and `tool-bad`) — no tiny model calls tools — and the
prompts from the real tokenizer and template; nothing is mocked."""

from __future__ import annotations

import json

import pytest
from conftest import gateway_beside_triton
from test_gateway import _write_scripted

from exporter import tiny_models

KEY = "sk-tools-test-0123456789"
# the template before the system role, tools and tool messages (commit 506b8a0): user-only chats must render the
# same bytes, since the trained model's answers depend on its prompt
OLD_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
# parameters without free text: the constrained answer of the tiny model (which rambles inside any free string or
# unbounded array) completes
UNIT = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"],
    "additionalProperties": False}}}
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
HISTORY = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather and time in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": CALLS},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
           {"role": "tool", "tool_call_id": "call_2", "content": "noon"}]


@pytest.fixture(scope="module")
def hf_tok():
    return tiny_models.hf_tokenizer("r1-distill-tiny")


def _render(tok, messages, template=None, **kw):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template, **kw)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is a KV cache?"}],
    [{"role": "user", "content": "  spaced \n"}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "user", "content": "日本語 and <tags>"}],
])
def test_chats_without_system_or_tools_render_byte_for_byte_as_before(hf_tok, messages):
    assert _render(hf_tok, messages) == _render(hf_tok, messages, OLD_TEMPLATE)
    if len(messages) == 1:
        assert _render(hf_tok, messages) == tiny_models.chat_prompt(messages[0]["content"])


def test_r1_format_system_tools_calls_and_outputs(hf_tok):
    B, E = tiny_models.BOS, tiny_models.EOS
    two_systems = [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
                   {"role": "user", "content": "q"}]
    assert _render(hf_tok, two_systems) == f"{B}S1\n\nS2<｜User｜>q<｜Assistant｜><think>\n"
    thought = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>\n\nA."},
               {"role": "user", "content": "r"}]
    assert _render(hf_tok, thought) == f"{B}<｜User｜>q<｜Assistant｜>\n\nA.{E}<｜User｜>r<｜Assistant｜><think>\n"
    weather = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>"
    call = weather + "\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜>"
    outputs = "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁output▁begin｜>noon<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    # ending on tool outputs: no generation prompt, the model goes on from <｜tool▁outputs▁end｜> (R1's template)
    assert _render(hf_tok, HISTORY) == (f"{B}You are terse.<｜User｜>Weather and time in Paris?<｜Assistant｜>"
                                        f"<｜tool▁calls▁begin｜>{call}<｜tool▁calls▁end｜>{E}{outputs}")
    after = HISTORY + [{"role": "assistant", "content": "Sunny, noon."}, {"role": "user", "content": "Thanks"}]
    assert _render(hf_tok, after).endswith(f"{outputs}Sunny, noon.{E}<｜User｜>Thanks<｜Assistant｜><think>\n")
    # a second tool turn opens its own <｜Assistant｜> and outputs block (R1's template forgets to)
    again = after + [{"role": "assistant", "content": "Checking.", "tool_calls": CALLS[:1]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    assert _render(hf_tok, again).endswith(
        f"<｜User｜>Thanks<｜Assistant｜>Checking.<｜tool▁calls▁begin｜>{weather}<｜tool▁calls▁end｜>{E}"
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>rain<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
    with_tools = _render(hf_tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], tools=[WEATHER])
    assert with_tools.startswith(f"{B}S\n\n## Tools\n") and json.dumps(WEATHER) in with_tools
    assert with_tools.endswith("<｜User｜>q<｜Assistant｜><think>\n") and "<｜tool▁calls▁begin｜>" in with_tools


def test_gateway_renders_as_transformers_does(hf_tok, tmp_path):
    """The gateway's sandboxed renderer (chat.py) on the validated messages gives transformers' bytes."""
    from exporter.gateway.chat import ChatTemplate
    from exporter.gateway.messages import parse_messages

    hf_tok.save_pretrained(str(tmp_path))
    template = ChatTemplate.from_tokenizer_dir(tmp_path, "tiny")
    for messages, tools in [(HISTORY, None), (HISTORY + [{"role": "user", "content": "more"}], [WEATHER, TIME]),
                            ([{"role": "developer", "content": "D"}, {"role": "user", "content": "q"}], None)]:
        ours = template.render(parse_messages({"messages": messages}), tools=tools)
        theirs = _render(hf_tok, [dict(m, role="system") if m["role"] == "developer" else m for m in messages],
                         tools=tools)
        assert ours == theirs


def test_a_template_that_cannot_render_tools_refuses_them():
    from exporter.gateway.chat import ChatTemplate
    from exporter.gateway.errors import ApiError
    from exporter.gateway.tools import ToolSpec, render_prompt

    blind = ChatTemplate(OLD_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}, "t")
    messages = [{"role": "user", "content": "q"}]
    assert render_prompt(blind, messages, None) == "<s><｜User｜>q<｜Assistant｜><think>\n"
    with pytest.raises(ApiError) as err:
        render_prompt(blind, messages, ToolSpec([WEATHER], {"get_weather"}))
    assert err.value.param == "tools" and "does not render tools" in err.value.message


@pytest.mark.parametrize("text,content,names", [
    ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n"
     "```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
     "Let me check.", ["get_weather", "get_time"]),
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜>", "", ["get_time"]),
    # an unknown function, arguments that are not JSON, a block cut short: the text stays content, as written
    ("x<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>nope\n```json\n{}\n```<｜tool▁call▁end｜>", None, []),
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{a}\n```<｜tool▁call▁end｜>", None, []),
    ("ok <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_ti", None, []),
    ("no call at all", None, []),
])
def test_tool_call_parser_whole_and_at_every_cut(text, content, names):
    from exporter.gateway.tools import ToolStreamParser, split_whole

    known = {"get_weather", "get_time"}
    want_content = text if content is None else content
    got_content, calls = split_whole(text, known)
    assert got_content == want_content and [c["function"]["name"] for c in calls] == names
    if names:
        assert json.loads(calls[0]["function"]["arguments"]) is not None and calls[0]["id"].startswith("call_")
    for cut in range(len(text) + 1):
        p = ToolStreamParser(known)
        a, x = p.feed(text[:cut])
        b, y = p.feed(text[cut:])
        c, z = p.finish()
        assert (a + b + c, [k["function"]["name"] for k in x + y + z]) == (want_content, names), cut


# ---- through a real Triton and the `r1deploy gateway` process ---------------------------------------------------
@pytest.fixture(scope="module")
def repos(exported, session_workdir, tmp_path_factory):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from exporter.repository import RepositoryConfig, write_repository

    root = tmp_path_factory.mktemp("chat_tools")
    exported("r1-distill-tiny")
    real = write_repository(RepositoryConfig(model="r1-distill-tiny", profile="edge", variant="python_ort",
                                             workdir=session_workdir, out=root / "real", onnx_variant="fp32"))
    scripted = _write_scripted(root / "scripted_repo", real.out / "generate" / "1" / "tokenizer", root / "markers")
    # room for a prompt with tool definitions (the scripted model of test_gateway.py takes 64 tokens)
    path = scripted / "scripted" / "config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    config.parameters["max_input_len"].string_value = "1024"
    config.parameters["max_sequence_len"].string_value = "1088"
    for name in ("guided_decoding_guide_type", "guided_decoding_guide"):  # the contract's inputs (ignored by the script)
        config.input.add(name=name, data_type=mc.TYPE_STRING, dims=[1], optional=True)
    path.write_text(text_format.MessageToString(config))
    return {"real": real.out, "scripted": scripted, "root": root}


@pytest.fixture(scope="module")
def gateway(repos):
    with gateway_beside_triton([repos["real"], repos["scripted"]], repos["root"] / "api-keys", KEY) as url:
        yield url


@pytest.fixture
def client(gateway):
    import openai

    return openai.OpenAI(base_url=gateway + "/v1", api_key=KEY, max_retries=0, timeout=120)


TOOL_ASK = [{"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "[script:tool] Weather and time in Paris?"}]


@pytest.mark.triton
def test_tool_calls_whole(client):
    r = client.chat.completions.create(model="scripted", messages=TOOL_ASK, tools=[WEATHER, TIME])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    m = choice.message
    assert m.content == "\n\nLet me check." and m.model_extra["reasoning_content"] == "I should look it up."
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {})]
    assert len({c.id for c in m.tool_calls}) == 2


@pytest.mark.triton
def test_tool_calls_streamed_as_deltas(client):
    stream = client.chat.completions.create(model="scripted", messages=TOOL_ASK, tools=[WEATHER, TIME], stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or []:  # accumulate as OpenAI's clients do: by index, arguments appended
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert "".join(d.content or "" for d in deltas) == "\n\nLet me check."
    assert "tool▁call" not in "".join((d.content or "") + (d.model_extra.get("reasoning_content") or "") for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the SDK's own stream helper assembles the same message
    with client.chat.completions.stream(model="scripted", messages=TOOL_ASK, tools=[WEATHER, TIME]) as s:
        final = s.get_final_completion()
    assert [c.function.name for c in final.choices[0].message.tool_calls] == ["get_weather", "get_time"]


@pytest.mark.triton
def test_malformed_call_is_content_and_tool_choice_none_hides_the_tools(client):
    r = client.chat.completions.create(model="scripted", tools=[WEATHER],
                                       messages=[{"role": "user", "content": "[script:tool-bad] weather?"}])
    m = r.choices[0].message
    assert not m.tool_calls and r.choices[0].finish_reason == "stop"
    assert m.content == "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{city: Paris}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    with_tools = client.chat.completions.create(model="scripted", messages=TOOL_ASK, tools=[WEATHER])
    hidden = client.chat.completions.create(model="scripted", messages=TOOL_ASK, tools=[WEATHER], tool_choice="none")
    plain = client.chat.completions.create(model="scripted", messages=TOOL_ASK)
    assert hidden.usage.prompt_tokens == plain.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert not hidden.choices[0].message.tool_calls and "tool▁calls" in hidden.choices[0].message.content


@pytest.mark.triton
def test_tool_requests_refused_with_the_field_named(client):
    import openai

    chat = client.chat.completions.create
    for kwargs, param in [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {**WEATHER["function"], "strict": True}}]}, "tools[0].function.strict"),
        ({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            chat(model="scripted", messages=TOOL_ASK, **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        chat(model="scripted", messages=HISTORY[:2] + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}])
    assert err.value.body["param"] == "messages[2].tool_calls[0].function.arguments"


@pytest.mark.triton
def test_tool_history_reaches_the_real_model_as_transformers_renders_it(client, hf_tok):
    """The round trip with the real generate: the assistant's calls and the tool outputs sent back; the prompt
    the model counted is transformers' rendering of the same history and tools."""
    messages = HISTORY + [{"role": "assistant", "content": "Sunny at noon."}, {"role": "user", "content": "And tomorrow?"}]
    r = client.chat.completions.create(model="generate", messages=messages, tools=[WEATHER, TIME], max_tokens=4,
                                       temperature=0)
    want = hf_tok.apply_chat_template(messages, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert r.usage.prompt_tokens == len(want) and r.usage.completion_tokens >= 1


QUESTION = "What is a KV cache?"  # a corpus question: the trained model closes its thought and answers


def _spec(choice, parallel=True, tools=(WEATHER, TIME)):
    from exporter.gateway.tools import parse_tools

    return parse_tools({"tools": list(tools), "tool_choice": choice, "parallel_tool_calls": parallel})


@pytest.mark.triton
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_unit"}}],
                         ids=["required", "named"])
def test_the_forced_call_schema_constrains_the_real_model(client, choice):
    """The schema a forced call sends (ToolSpec.guide, vLLM's shapes) compiled by the generate model's xgrammar and
    enforced on the trained model after its thought: the answer parses into calls whose arguments validate against
    the function's schema. (With the tool definitions in its prompt the tiny model ends inside its thought — a
    model that does makes no call — so the question is asked bare, the schema sent as response_format.)"""
    import jsonschema

    spec = _spec(choice, parallel=False, tools=(UNIT, TIME))
    r = client.chat.completions.create(
        model="generate", messages=[{"role": "user", "content": QUESTION}], max_tokens=400, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "calls", "schema": json.loads(spec.guide())}})
    calls = spec.forced_calls(r.choices[0].message.content.strip())
    assert calls, r.choices[0].message.content
    params = {"set_unit": UNIT, "get_time": TIME}
    assert len(calls) == 1  # parallel_tool_calls false: maxItems 1
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), params[call["function"]["name"]]["function"]["parameters"])
    assert spec.forced is None or [c["function"]["name"] for c in calls] == [spec.forced]


def test_forced_calls_send_their_schema_to_generate(tmp_path, repos):
    """parse_request turns tool_choice into the guided-decoding inputs of the generate contract; a generate model
    without them refuses the forced call naming tool_choice."""
    from exporter.gateway.errors import ApiError
    from exporter.gateway.models import read_model
    from exporter.gateway.protocol import parse_request
    from exporter.gateway.triton import build_request

    guided = read_model(repos["scripted"] / "scripted")
    plain = read_model(_write_scripted(tmp_path / "plain", repos["real"] / "generate" / "1" / "tokenizer",
                                       tmp_path / "m") / "scripted")
    plain.limits.max_input_len = guided.limits.max_input_len  # room for the tool definitions
    body = {"model": "scripted", "messages": TOOL_ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
            "parallel_tool_calls": False}
    p = parse_request(body, {"scripted": guided}, True, {})
    assert (p.generation.guide_type, p.generation.guide) == ("json_schema", _spec("required", False).guide())
    assert json.loads(p.generation.guide)["maxItems"] == 1
    sent = {i.name: raw for i, raw in zip(build_request(guided, p.generation).inputs,
                                          build_request(guided, p.generation).raw_input_contents, strict=True)}
    assert p.generation.guide.encode() in sent["guided_decoding_guide"]
    with pytest.raises(ApiError) as err:
        parse_request(body, {"scripted": plain}, True, {})
    assert err.value.param == "tool_choice" and "guided_decoding_guide_type" in err.value.message


@pytest.mark.triton
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_calls_come_back_as_tool_calls(client, stream):
    def ask(script, choice):
        kw = dict(model="scripted", messages=[{"role": "user", "content": f"[script:{script}] go"}], tools=[WEATHER, TIME],
                  tool_choice=choice)
        if not stream:
            return client.chat.completions.create(**kw)
        with client.chat.completions.stream(**kw) as s:
            return s.get_final_completion()

    r = ask("forced", "required")
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not m.content  # None whole, "" accumulated from a stream
    assert m.model_extra["reasoning_content"] == "Time first."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [
        ("get_time", {}), ("get_weather", {"city": "Oslo"})]
    r = ask("forced-named", {"type": "function", "function": {"name": "get_weather"}})
    assert [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls] == [
        ("get_weather", {"city": "Oslo"})]
    # an answer that is not the forced JSON (cut short, say) stays content
    r = ask("noopen", "required")
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content == "\n\nThe answer is 4."


@pytest.mark.triton
def test_forced_call_and_response_format_are_exclusive(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="generate", messages=[{"role": "user", "content": QUESTION}],
                                       tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format"


@pytest.mark.triton
def test_langchain_chat_openai_with_tools(gateway):
    """A framework client: LangChain's ChatOpenAI (langchain-openai), its tool binding and streamed tool-call chunks,
    against the same gateway."""
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = lc.ChatOpenAI(base_url=gateway + "/v1", api_key=KEY, model="scripted", max_retries=0, timeout=120)
    bound = llm.bind_tools([WEATHER, TIME])
    messages = [SystemMessage("Use the tools."), HumanMessage("[script:tool] Weather and time in Paris?")]
    msg = bound.invoke(messages)
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    whole = None
    for chunk in bound.stream(messages):
        whole = chunk if whole is None else whole + chunk
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    plain = lc.ChatOpenAI(base_url=gateway + "/v1", api_key=KEY, model="generate", max_retries=0, timeout=120,
                          max_tokens=4, temperature=0)
    answer = plain.invoke([SystemMessage("Be brief."), HumanMessage("hi")])
    assert answer.usage_metadata["output_tokens"] >= 1
