"""The shared stop-string filter: split stop strings are caught and never shown in part."""
from modules.generation_params import TokenEvent
from modules.stopping import StopStringFilter


def feed(pieces: list[str], stops: list[str]) -> tuple[list[str], StopStringFilter]:
    stop_filter = StopStringFilter(stops)
    shown = []
    for index, piece in enumerate(pieces):
        chunk = stop_filter.push(TokenEvent(token_id=index, text=piece))
        shown.append(chunk.text)
        if stop_filter.stopped:
            break
    else:
        shown.append(stop_filter.flush().text)
    return shown, stop_filter


def test_stop_string_split_over_three_tokens_is_never_shown():
    shown, stop_filter = feed(["Hello", " wor", "ld\n", "Us", "er:", " more"], ["\nUser:"])
    assert "".join(shown) == "Hello world"
    assert stop_filter.stopped and stop_filter.matched == "\nUser:"
    assert not any("\n" in piece for piece in shown)


def test_held_text_is_released_when_the_prefix_does_not_complete():
    shown, stop_filter = feed(["a", "\nU", "nrelated"], ["\nUser:"])
    assert "".join(shown) == "a\nUnrelated"
    assert shown[1] == ""  # "\nU" could still become the stop string, so it waited
    assert not stop_filter.stopped


def test_earliest_of_several_stop_strings_wins():
    shown, stop_filter = feed(["x END y STOP"], ["STOP", "END"])
    assert "".join(shown) == "x "
    assert stop_filter.matched == "END"


def test_tokens_are_released_with_their_text_and_dropped_inside_the_stop():
    stop_filter = StopStringFilter(["##"])
    released = []
    for index, piece in enumerate(["ab", "c#", "#d"]):
        released += [t.token_id for t in stop_filter.push(TokenEvent(token_id=index, text=piece)).tokens]
    assert released == [0]  # token 1 ("c#") was cut inside the stop string
    assert stop_filter.stopped


def test_no_stop_strings_passes_everything_through_at_once():
    stop_filter = StopStringFilter([])
    chunk = stop_filter.push(TokenEvent(token_id=1, text="abc"))
    assert chunk.text == "abc" and [t.token_id for t in chunk.tokens] == [1]


def test_empty_text_tokens_travel_with_the_following_text():
    stop_filter = StopStringFilter(["zz"])
    first = stop_filter.push(TokenEvent(token_id=1, text=""))  # half a UTF-8 character
    second = stop_filter.push(TokenEvent(token_id=2, text="é"))
    assert [t.token_id for t in first.tokens + second.tokens] == [1, 2]
    assert first.text + second.text == "é"
