"""The UI's Gradio-free parts without a browser: widgets drawn from typed fields convert values both ways, and
chat turns (modules.ui.chat_runner) keep the chat on disk right, on the real starter model."""
from __future__ import annotations

import threading

import pytest

from conftest import FRANCE
from modules.errors import ConfigError
from modules.generation_params import GenerationParams
from modules.presets import load_preset
from modules.settings import ChatSettings, loader_option_types
from modules.ui.chat_runner import run_turn
from modules.ui.session_state import UiSession, new_session_id
from modules.ui.widgets import field_kind, from_widget, to_widget


@pytest.mark.parametrize("model", [GenerationParams, ChatSettings, *loader_option_types().values()],
                         ids=lambda m: m.__name__)
def test_every_field_survives_the_trip_through_its_widget(model) -> None:
    defaults = model()
    for name, field in model.model_fields.items():
        kind = field_kind(field.annotation)
        value = getattr(defaults, name)
        assert from_widget(name, kind, to_widget(kind, value)) == value, name


def test_widget_values_that_are_not_json_are_refused_by_name() -> None:
    kind = field_kind(GenerationParams.model_fields["logit_bias"].annotation)
    with pytest.raises(ConfigError, match="'logit_bias' is not valid JSON"):
        from_widget("logit_bias", kind, "{1: 2")
    stops = field_kind(GenerationParams.model_fields["stop"].annotation)
    assert from_widget("stop", stops, '["\\n\\n", "###"]') == ["\n\n", "###"]
    assert from_widget("stop", stops, "###\nEND") == ["###", "END"]
    schema = field_kind(GenerationParams.model_fields["json_schema"].annotation)
    with pytest.raises(ConfigError, match="'json_schema' is nested too deeply"):  # not "Internal error"
        from_widget("json_schema", schema, '{"a":' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(ConfigError, match="'stop' is nested too deeply"):
        from_widget("stop", stops, "[" * 100_000 + "]" * 100_000)


def run(services, session, params, action, text=""):
    return list(run_turn(services, session, services.settings.chat, params, action, text))[-1]


def test_a_turn_is_saved_and_regenerate_keeps_the_old_reply_as_an_alternative(services) -> None:
    session = UiSession.start(services, new_session_id())
    greedy = load_preset(services.settings.preset_dir, "Deterministic").model_copy(update={"max_new_tokens": 30})
    last = run(services, session, greedy, "send", FRANCE)
    assert last.done and "Paris" in last.messages[-1]["content"]
    stored = session.store.load(session.character, session.history.id)
    assert [m.role for m in stored.messages] == ["user", "assistant"]
    sampled = load_preset(services.settings.preset_dir, "Creative").model_copy(
        update={"seed": 7, "max_new_tokens": 12, "ban_eos_token": True})
    run(services, session, sampled, "regenerate")
    reply = session.store.load(session.character, session.history.id).messages[-1]
    assert len(reply.swipes) == 2 and reply.swipes[0] == stored.messages[-1].content
    assert reply.content == reply.swipes[1] != reply.swipes[0]


def test_stop_keeps_the_cut_reply_on_disk(services) -> None:
    session = UiSession.start(services, new_session_id())
    params = GenerationParams(do_sample=False, max_new_tokens=2000, ban_eos_token=True)
    updates = run_turn(services, session, services.settings.chat, params, "send", "Tell me a very long story.")
    seen = 0
    for update in updates:
        if update.done:
            break
        seen += 1
        if seen == 3:
            threading.Thread(target=session.stop).start()
    assert "stopped" in update.status
    saved = session.store.load(session.character, session.history.id).messages[-1]
    assert saved.role == "assistant" and saved.content and saved.content == update.messages[-1]["content"]
    assert not session.busy


def test_a_refused_grammar_saves_nothing(services) -> None:
    """The check runs before the user's message is saved, so a refused schema leaves no turn without a reply."""
    session = UiSession.start(services, new_session_id())
    greedy = GenerationParams(do_sample=False, max_new_tokens=8)
    run(services, session, greedy, "send", FRANCE)
    before = session.store.load(session.character, session.history.id).messages
    refused = greedy.model_copy(update={"json_schema": {"type": "object", "required": "name"}})
    with pytest.raises(ConfigError, match="json_schema"):
        run(services, session, refused, "send", "Describe Paris as JSON.")
    assert session.store.load(session.character, session.history.id).messages == before
