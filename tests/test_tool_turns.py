"""Tools in the Chat tab without a browser: the pick a chat records, how calls and results show, the history in
OpenAI's form (and older chat files still read), the toolbox's start-up and shutdown, and turns with tools on the
real starter model (a forced call of a test tool, approval declined, a tool that raises)."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from conftest import MODEL_DIR, wait_until
from test_chat_reasoning import THINKING_TEMPLATE

from modules.chat.history import ChatMessage, HistoryStore
from modules.chat.request import ChatRequest, prepare_chat
from modules.errors import ConfigError
from modules.generation_params import GenerationParams
from modules.services import build_services, start_toolbox
from modules.settings import McpServerSettings, load_settings
from modules.starter import STARTER_GGUF
from modules.tools.toolbox import Toolbox
from modules.ui.chat_runner import chatbot_messages, run_turn
from modules.ui.model_choice import ModelChoice
from modules.ui.session_state import UiSession, new_session_id
from modules.ui.tool_messages import ToolPick, fenced, tool_entries
from modules.ui.tool_turns import _Round, _Status

TOOL_FILE = Path(__file__).parent / "tool_files" / "chat_demo.py"
CALL = {"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 12, "b": 7}'}}


# --- the pick and the blocks ----------------------------------------------------------------------------------
def test_a_pick_is_recorded_on_the_turn_and_read_back_from_the_chat() -> None:
    pick = ToolPick.of(["multiply", "clear_notes", "multiply"], "required")
    assert pick == ToolPick(("multiply", "clear_notes"), "required")
    messages = [ChatMessage(role="user", content="Hi", metadata={"model": "m", **pick.stamp()}),
                ChatMessage(role="assistant", content="Hello", metadata={"model": "m"})]
    assert ToolPick.of_chat(messages) == pick
    put_away = [*messages, ChatMessage(role="user", content="Again", metadata=ToolPick().stamp())]
    assert ToolPick.of_chat(put_away) == ToolPick((), "auto")  # tools put away: the chat reopens without them
    assert ToolPick.of_chat([ChatMessage(role="user", content="Old chat")]) is None
    assert ToolPick.of(["x"], "bogus").use == "auto"


def test_calls_and_results_show_as_collapsible_blocks_one_entry_per_message() -> None:
    messages = [ChatMessage(role="user", content="What is 12 times 7?"),
                ChatMessage(role="assistant", content="", tool_calls=[CALL]),
                ChatMessage(role="tool", content="84", name="multiply", tool_call_id="call_1"),
                ChatMessage(role="assistant", content="It is 84.")]
    shown = chatbot_messages(messages)
    assert len(shown) == len(messages)
    assert shown[1]["metadata"] == {"title": '🛠️ multiply({"a": 12, "b": 7})', "status": "done"}
    assert 'multiply({"a": 12, "b": 7})' in shown[1]["content"]
    assert shown[2] == {"role": "assistant", "content": "```\n84\n```",
                        "metadata": {"title": "✅ multiply: result", "status": "done"}}
    assert shown[3] == {"role": "assistant", "content": "It is 84."}
    # a call not answered yet is pending; failed and declined results say so in their titles
    assert tool_entries(messages[:2])[1]["metadata"]["status"] == "pending"
    failed = ChatMessage(role="tool", content="Error: read_sensor failed: RuntimeError: off", name="read_sensor",
                         tool_call_id="c", metadata={"tool_error": "failed"})
    declined = failed.model_copy(update={"name": "clear_notes", "metadata": {"tool_error": "declined"}})
    assert tool_entries([failed])[0]["metadata"]["title"] == "⚠️ read_sensor: error (failed)"
    assert tool_entries([declined])[0]["metadata"]["title"] == "🚫 clear_notes: declined"


def test_a_result_with_backticks_cannot_close_its_block() -> None:
    assert fenced("a ``` b") == "````\na ``` b\n````"


def test_the_status_line_says_when_the_round_limit_ended_the_turn(tmp_path: Path) -> None:
    services = build_services(load_settings(["--model-dir", str(MODEL_DIR), "--user-data-dir", str(tmp_path),
                                             "--settings", str(_file(tmp_path / "s.yaml", "tool_max_rounds: 3\n"))]))
    status = _Status("m", [_Round(100, 2048, 0)])
    status.running({"tool_calls": [CALL]})
    line = status.done("round_limit", services)
    assert "1 tool call" in line and "the limit of 3 rounds of tool calls (tool_max_rounds) was reached" in line


def test_tool_messages_are_kept_in_the_history_and_older_files_still_read(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    chat = store.new("Assistant", [
        {"role": "user", "content": "What is 12 times 7?", "metadata": ToolPick(("multiply",)).stamp()},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "84", "name": "multiply", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 84."}])
    again = store.load("Assistant", chat.id)
    assert again.prompt_messages()[1:3] == [
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "84", "name": "multiply", "tool_call_id": "call_1"}]
    assert ToolPick.of_chat(again.messages) == ToolPick(("multiply",))
    old = tmp_path / "Assistant" / "old.json"  # a chat file written before tools were in the chat
    old.write_text('{"version": 1, "id": "old", "character": "Assistant", "messages": '
                   '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}')
    assert ToolPick.of_chat(store.load("Assistant", "old").messages) is None


# --- the toolbox's life in the app ----------------------------------------------------------------------------
def test_the_toolbox_starts_without_waiting_for_mcp_servers_and_reports_one_that_fails(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    tools.mkdir()
    shutil.copy(TOOL_FILE, tools)
    dead = McpServerSettings(name="dead", command=str(tmp_path / "no-such-server"))
    toolbox = Toolbox(tools_dir=tools, mcp_servers=[dead])
    toolbox.start()
    try:
        assert {"multiply", "clear_notes", "read_sensor", "calculate"} <= set(toolbox.tools)  # files: at once
        wait_until(lambda: not toolbox.connecting, "the MCP servers' connecting to end")
        assert [problem.source for problem in toolbox.problems] == ["mcp:dead"]
    finally:
        toolbox.close()


def test_services_close_the_toolbox(tmp_path: Path) -> None:
    settings = load_settings(["--model-dir", str(MODEL_DIR), "--user-data-dir", str(tmp_path),
                              "--settings", str(_file(tmp_path / "s.yaml", ""))])
    services = build_services(settings)
    toolbox = start_toolbox(services)
    assert services.toolbox is toolbox and "calculate" in toolbox.tools
    services.close()
    assert toolbox._closed


# --- turns on the starter model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path):
    folder = tmp_path_factory.mktemp("tool-turns")
    tools = folder / "tools"
    tools.mkdir()
    shutil.copy(TOOL_FILE, tools)
    settings_file = _file(folder / "settings.yaml", f"tools_dir: {tools}\ntool_max_rounds: 2\n")
    services = build_services(load_settings(["--model-dir", str(MODEL_DIR), "--user-data-dir",
                                             str(folder / "user_data"), "--settings", str(settings_file)]))
    start_toolbox(services)
    services.manager.load(STARTER_GGUF)
    yield services
    services.manager.unload()
    services.close()


GREEDY = GenerationParams(do_sample=False, max_new_tokens=40)


def turn(services, session: UiSession, text: str, tool: str, *, on_approval=None):
    """Send `text` with `tool` picked and a call required; `on_approval(update)` answers an approval request."""
    last = None
    for update in run_turn(services, session, services.settings.chat, GREEDY, "send", text,
                           ModelChoice(STARTER_GGUF), ToolPick((tool,), "required")):
        if update.approval and on_approval is not None:
            on_approval(update)
        last = update
    return last


@pytest.mark.slow
def test_a_forced_call_runs_and_the_model_answers_with_its_result(services) -> None:
    session = UiSession.start(services, new_session_id())
    last = turn(services, session, "What is 12 times 7?", "multiply")
    assert last.done and not session.busy
    saved = session.store.load(session.character, session.history.id).messages
    assert [m.role for m in saved] == ["user", "assistant", "tool", "assistant"]
    call = saved[1].tool_calls[0]
    assert call["function"]["name"] == "multiply" and saved[2].tool_call_id == call["id"]
    assert saved[2].content == "84" and "84" in saved[3].content
    assert ToolPick.of_chat(saved) == ToolPick(("multiply",), "required")
    assert last.messages[2]["metadata"]["title"] == "✅ multiply: result"
    # the next turn (same pick) reads the call and its result: the starter's template ignores tools, so the
    # tools' system message writes them in the Hermes form
    follow = [*session.history.prompt_messages(), {"role": "user", "content": "Thanks."}]
    tools = services.toolbox.runner(["multiply"]).openai_tools()
    prepared = prepare_chat(services, ChatRequest(messages=follow, chat=services.settings.chat, params=GREEDY,
                                                  tools=tools))
    assert '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 7}}' in prepared.prompt
    assert "<tool_response>\n84\n</tool_response>" in prepared.prompt


@pytest.mark.slow
def test_a_declined_call_never_runs_and_the_model_is_told(services) -> None:
    session = UiSession.start(services, new_session_id())
    asked = []

    def deny(update) -> None:
        asked.append(update.approval)
        assert session.tool_turn.answer(False)

    last = turn(services, session, "Delete all my notes.", "clear_notes", on_approval=deny)
    assert asked and "clear_notes" in asked[0]
    saved = session.store.load(session.character, session.history.id).messages
    declined = next(m for m in saved if m.role == "tool")
    assert declined.content == "Error: the user declined this call of clear_notes"
    assert declined.metadata["tool_error"] == "declined"
    assert not (Path(services.settings.tools_dir) / "notes-cleared").exists()
    assert last.done and saved[-1].role in ("assistant", "tool")


@pytest.mark.slow
def test_stop_while_a_call_waits_for_approval_declines_it_and_ends_the_turn(services) -> None:
    session = UiSession.start(services, new_session_id())
    stopper = lambda update: threading.Thread(target=session.stop).start()  # as the Stop button
    last = turn(services, session, "Delete all my notes.", "clear_notes", on_approval=stopper)
    assert last.done and "stopped" in last.status and not session.busy
    saved = session.store.load(session.character, session.history.id).messages
    assert [m.role for m in saved] == ["user", "assistant", "tool"]
    assert not (Path(services.settings.tools_dir) / "notes-cleared").exists()


@pytest.mark.slow
def test_a_tool_that_raises_gives_the_model_an_error_and_the_turn_ends_with_an_answer(services) -> None:
    session = UiSession.start(services, new_session_id())
    last = turn(services, session, "How warm is the greenhouse?", "read_sensor")
    assert last.done
    saved = session.store.load(session.character, session.history.id).messages
    failed = next(m for m in saved if m.role == "tool")
    assert failed.content == "Error: read_sensor failed: RuntimeError: the sensor is offline"
    assert failed.metadata["tool_error"] == "failed"
    assert last.messages[2]["metadata"]["title"] == "⚠️ read_sensor: error (failed)"
    assert saved[-1].role == "assistant" and saved[-1].content and not saved[-1].tool_calls


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- Regenerate, Continue and Impersonate with tools picked, and thinking in a tool turn -----------------------
#: The starter does not think, nor call tools by itself: this grammar makes every reply think, then call multiply.
THINK_THEN_CALL = ('root ::= "<think>\\nThe user wants " [a-z ]{3,30} "\\n</think>\\n\\n<tool_call>\\n'
                   '{\\"name\\": \\"multiply\\", \\"arguments\\": {\\"a\\": 12, \\"b\\": 7}}\\n</tool_call>"')
#: This one makes every reply say a sentence, then call multiply.
TEXT_THEN_CALL = ('root ::= "Let me compute it.\\n<tool_call>\\n{\\"name\\": \\"multiply\\", '
                  '\\"arguments\\": {\\"a\\": 12, \\"b\\": 7}}\\n</tool_call>"')
HERMES_CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 7}}\n</tool_call>'


def act(services, session: UiSession, action: str, pick: ToolPick, text: str = "", params=GREEDY, on_approval=None):
    """Run an `action` turn with `pick`; returns the last update (`on_approval(update)` answers approvals)."""
    last = None
    for update in run_turn(services, session, services.settings.chat, params, action, text,
                           ModelChoice(STARTER_GGUF), pick):
        if update.approval:
            assert on_approval is not None, f"unexpected approval: {update.approval}"
            on_approval(update)
        last = update
    return last


def saved_messages(session: UiSession) -> list[ChatMessage]:
    return session.store.load(session.character, session.history.id).messages


@pytest.mark.slow
def test_regenerate_runs_the_turn_again_with_its_tools(services) -> None:
    session = UiSession.start(services, new_session_id())
    pick = ToolPick(("multiply",), "required")
    act(services, session, "send", pick, "What is 12 times 7?")
    first = saved_messages(session)
    last = act(services, session, "regenerate", pick)
    assert last.done and "1 tool call" in last.status
    again = saved_messages(session)
    assert [m.role for m in again] == ["user", "assistant", "tool", "assistant"]  # the old turn replaced
    assert again[1].tool_calls[0]["id"] != first[1].tool_calls[0]["id"]  # a new call, run again
    assert again[2].content == "84" and again[2].tool_call_id == again[1].tool_calls[0]["id"]
    assert [entry["metadata"]["title"] for entry in last.messages if entry.get("metadata")] == [
        '🛠️ multiply({"a": 12, "b": 7})', "✅ multiply: result"]

    plain = UiSession.start(services, new_session_id())  # a plain reply, regenerated with a call forced
    act(services, plain, "send", ToolPick(), "What is 12 times 7?")
    assert [m.role for m in saved_messages(plain)] == ["user", "assistant"]
    act(services, plain, "regenerate", pick)
    assert [m.role for m in saved_messages(plain)] == ["user", "assistant", "tool", "assistant"]

    joke = UiSession.start(services, new_session_id())  # no call before nor now: the old reply is an alternative
    for action, seed in (("send", 1), ("regenerate", 2)):
        act(services, joke, action, ToolPick(("multiply",), "auto"), "Tell me a joke about cats.",
            params=GenerationParams(do_sample=True, seed=seed, max_new_tokens=30))
    saved = saved_messages(joke)
    assert [m.role for m in saved] == ["user", "assistant"] and not saved[1].tool_calls
    assert len(saved[1].swipes) == 2 and saved[1].swipe_index == 1 and saved[1].swipes[0] != saved[1].content


@pytest.mark.slow
def test_regenerate_with_no_tools_picked_replaces_a_turn_with_calls_by_a_plain_reply(services) -> None:
    answered = UiSession.start(services, new_session_id())  # a whole tool turn: call, result, answer
    act(services, answered, "send", ToolPick(("multiply",), "required"), "What is 12 times 7?")
    assert [m.role for m in saved_messages(answered)] == ["user", "assistant", "tool", "assistant"]
    stopped = UiSession.start(services, new_session_id())  # a turn stopped before its call ran
    stopped.history = stopped.store.new(stopped.character, [
        ChatMessage(role="user", content="What is 12 times 7?"), ChatMessage(role="assistant", content="",
                                                                              tool_calls=[CALL])])
    for session in (answered, stopped):
        last = act(services, session, "regenerate", ToolPick())  # the tools were put away
        saved = saved_messages(session)
        assert [m.role for m in saved] == ["user", "assistant"], saved
        assert saved[1].content and not saved[1].tool_calls and not saved[1].swipes, saved[1]
        assert last.done and not [e for e in last.messages if e.get("metadata", {}).get("title", "").startswith(
            ("🛠️", "✅"))]


@pytest.mark.slow
def test_regenerate_asks_again_before_a_tool_that_needs_approval(services) -> None:
    session = UiSession.start(services, new_session_id())
    pick, asked = ToolPick(("clear_notes",), "required"), []

    def deny(update) -> None:
        asked.append(update.approval)
        assert session.tool_turn.answer(False)

    act(services, session, "send", pick, "Delete all my notes.", on_approval=deny)
    act(services, session, "regenerate", pick, on_approval=deny)
    assert len(asked) == 2 and all("clear_notes" in question for question in asked)
    saved = saved_messages(session)
    assert [m.content for m in saved if m.role == "tool"] == ["Error: the user declined this call of clear_notes"]
    assert not (Path(services.settings.tools_dir) / "notes-cleared").exists()


@pytest.mark.slow
def test_continue_runs_the_calls_a_reply_holds_and_answers_results(services) -> None:
    pick = ToolPick(("multiply",), "required")
    session = UiSession.start(services, new_session_id())  # a reply holding a call, as a user wrote it
    session.history = session.store.new(session.character, [
        ChatMessage(role="user", content="What is 12 times 7?"),
        ChatMessage(role="assistant", content=f"Let me compute it.\n{HERMES_CALL}")])
    last = act(services, session, "continue", pick)
    saved = saved_messages(session)
    assert [m.role for m in saved[:3]] == ["user", "assistant", "tool"] and saved[-1].role in ("assistant", "tool")
    assert saved[1].content == "Let me compute it." and saved[1].tool_calls[0]["function"]["name"] == "multiply"
    assert saved[2].content == "84" and "✅ multiply: result" in [e.get("metadata", {}).get("title")
                                                                 for e in last.messages]

    left = UiSession.start(services, new_session_id())  # a turn stopped while its tool ran: the call runs now
    left.history = left.store.new(left.character, [ChatMessage(role="user", content="What is 12 times 7?"),
                                                   ChatMessage(role="assistant", content="", tool_calls=[CALL])])
    act(services, left, "continue", pick)
    saved = saved_messages(left)
    assert [m.role for m in saved] == ["user", "assistant", "tool", "assistant"]
    assert saved[2].tool_call_id == "call_1" and saved[2].content == "84" and saved[3].content

    results = UiSession.start(services, new_session_id())  # a chat ending with a result: the model answers it
    results.history = results.store.new(results.character, saved[:3])
    with pytest.raises(ConfigError, match="pick tools"):  # without tools picked: it says how to go on
        act(services, results, "continue", ToolPick())
    act(services, results, "continue", pick)
    saved = saved_messages(results)
    assert [m.role for m in saved] == ["user", "assistant", "tool", "assistant"] and saved[3].content


@pytest.mark.slow
def test_impersonate_writes_the_users_text_and_runs_no_tool(services) -> None:
    session = UiSession.start(services, new_session_id())
    pick = ToolPick(("clear_notes",), "required")
    session.history = session.store.new(session.character, [
        ChatMessage(role="user", content="What is 12 times 7?"),
        ChatMessage(role="assistant", content="", tool_calls=[CALL]),
        ChatMessage(role="tool", content="84", name="multiply", tool_call_id="call_1"),
        ChatMessage(role="assistant", content="It is 84.")])
    before = saved_messages(session)
    last = act(services, session, "impersonate", pick, "Thanks")  # no approval is asked: act would fail
    assert last.done and last.impersonation.startswith("Thanks") and len(last.impersonation) > len("Thanks")
    assert saved_messages(session) == before  # the chat is unchanged: the text waits in the box
    assert not (Path(services.settings.tools_dir) / "notes-cleared").exists()


@pytest.mark.slow
def test_a_calls_markup_never_shows_while_the_reply_streams(services) -> None:
    session = UiSession.start(services, new_session_id())
    writes = GREEDY.model_copy(update={"max_new_tokens": 60, "grammar_string": TEXT_THEN_CALL})
    shown = []
    for update in run_turn(services, session, services.settings.chat, writes, "send", "What is 12 times 7?",
                           ModelChoice(STARTER_GGUF), ToolPick(("multiply",), "auto")):
        shown.append(" ".join(str(entry.get("content")) for entry in update.messages
                              if entry.get("role") == "assistant" and not entry.get("metadata")))
    assert not [text for text in shown if "tool_call" in text or '"arguments"' in text or "<tool" in text], shown
    assert any("Let me compute it." in text for text in shown[:-1])  # the text before the call streamed
    assert saved_messages(session)[1].tool_calls[0]["function"]["name"] == "multiply"


@pytest.mark.slow
def test_a_tool_turn_keeps_each_replys_thinking_apart(services) -> None:
    session = UiSession.start(services, new_session_id())
    thinks = GREEDY.model_copy(update={"max_new_tokens": 80, "grammar_string": THINK_THEN_CALL})
    last = act(services, session, "send", ToolPick(("multiply",), "auto"), "What is 12 times 7?", params=thinks)
    saved = saved_messages(session)
    # every reply thinks and calls: two rounds run (tool_max_rounds: 2), the third call is refused
    assert [m.role for m in saved] == ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool"]
    replies = [m for m in saved if m.role == "assistant"]
    assert all(m.reasoning_content and m.reasoning_content.startswith("The user wants") for m in replies)
    assert all("think>" not in m.content and m.tool_calls for m in replies)
    titles = [entry.get("metadata", {}).get("title") for entry in last.messages]
    assert titles[1:4] == ["Thinking", '🛠️ multiply({"a": 12, "b": 7})', "✅ multiply: result"]
    assert "stopped: the limit of 2 rounds" in last.status
    # the thinking goes back only to a template that renders it (the starter's does not; a Qwen3-like one does)
    follow = [*session.history.prompt_messages(), {"role": "user", "content": "Thanks."}]
    tools = services.toolbox.runner(["multiply"]).openai_tools()
    for template, rendered in ((None, False), (THINKING_TEMPLATE, True)):
        prepared = prepare_chat(services, ChatRequest(messages=follow, chat=services.settings.chat, params=GREEDY,
                                                      tools=tools, template=template))
        assert ("The user wants" in prepared.prompt) is rendered and "<tool_response>\n84" in prepared.prompt
