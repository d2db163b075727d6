"""Files attached to a chat message (modules.chat.attachments): each kind read into text (files made on the fly),
what cannot be read refused with the reason, the files kept with the chat on disk, and on the real starter model
the one chat path writing them into the prompt and refusing, with the numbers, files too large for the context."""
from __future__ import annotations

import codecs
from pathlib import Path

import pytest
from attachment_files import data_url, make_docx, make_pdf

from modules.chat.attachments import (
    Attachment,
    AttachmentTooLarge,
    clean_name,
    message_text,
    read_attachment,
    read_data_url,
    render_attachment,
)
from modules.chat.history import ChatMessage, HistoryStore
from modules.chat.request import prepare_chat
from modules.errors import ContextLengthExceeded, InvalidInput
from modules.ui.chat_runner import turn_request

FACT = "The lighthouse keeper on Varnholm island is called Edda Quist."


# --- reading each kind ----------------------------------------------------------------------------------------------


def test_text_markdown_and_code_are_read_as_they_are() -> None:
    text = read_attachment("notes.txt", FACT.encode())
    assert (text.kind, text.size, text.text) == ("text", len(FACT), FACT)
    markdown = read_attachment("README.md", b"# Title\r\n\r\n- item\r\n")
    assert markdown.kind == "markdown" and markdown.text == "# Title\n\n- item\n"  # newlines made plain
    code = read_attachment("tool.py", b"def add(a, b):\n    return a + b\n")
    assert code.kind == "code" and code.language == "python" and "return a + b" in code.text
    assert read_attachment("Makefile", b"all:\n\techo hi\n").language == "makefile"
    assert read_attachment("data.unknownext", b"plain words").kind == "text"  # text by its bytes


def test_text_in_other_encodings() -> None:
    assert read_attachment("u16.txt", codecs.BOM_UTF16_LE + "Grüße".encode("utf-16-le")).text == "Grüße"
    assert read_attachment("bom.txt", codecs.BOM_UTF8 + "café".encode()).text == "café"
    assert read_attachment("legacy.txt", "naïve – 5 €".encode("cp1252")).text == "naïve – 5 €"


def test_pdf_pages_are_read() -> None:
    pdf = read_attachment("report.pdf", make_pdf(["The vault code is 4417.", "Second page: nothing else."]))
    assert pdf.kind == "pdf"
    assert pdf.text == "The vault code is 4417.\n\nSecond page: nothing else."
    assert pdf.label == f"report.pdf (PDF, {pdf.size} B)"


def test_docx_paragraphs_and_tables_are_read_in_order() -> None:
    docx = read_attachment("notes.docx", make_docx(["First paragraph.", "Second paragraph."],
                                                   [["key", "value"], ["vault", "4417"]]))
    assert docx.kind == "docx"
    assert docx.text == "Field notes\nFirst paragraph.\nSecond paragraph.\nkey | value\nvault | 4417"


def test_html_gives_its_visible_text() -> None:
    page = (b"<!DOCTYPE html><html><head><title>Keepers</title><style>p {color: red}</style>"
            b"<script>var hidden = 'no';</script></head><body><h1>Varnholm</h1><p>Keeper: <b>Edda</b> Quist.</p>"
            b"<noscript>enable js</noscript></body></html>")
    html = read_attachment("page.html", page)
    assert html.kind == "html"
    assert html.text.splitlines()[0] == "Keepers"
    assert "Varnholm" in html.text and "Edda" in html.text and "Quist." in html.text
    assert "hidden" not in html.text and "color" not in html.text and "enable js" not in html.text
    assert read_attachment("saved", page).kind == "html"  # no extension: known by its start


# --- what is refused --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "says"), [
    ("empty.txt", b"", "empty.txt is empty"),
    ("blank.md", b"  \n\t\n", "only white space"),
    ("photo.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
    ("old.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "save it as .docx"),
    ("fake.pdf", b"just some text", "not a PDF"),
    ("fake.docx", b"not a zip at all", "not a DOCX"),
    ("archive.zip", b"PK\x03\x04" + b"\x00" * 40, "a ZIP archive"),
    ("cut.pdf", make_pdf(["The vault code is 4417."])[:120], "cannot be read: it is not a readable PDF"),
    ("scan.pdf", make_pdf([""]), "no text layer"),
    ("broken.docx", b"PK\x03\x04" + b"word/document.xml" + b"\x00" * 60, "cannot be read: it is not a readable DOCX"),
    ("weird.txt", b"\x81\x8d\x8f\x90\x9d", "neither UTF-8 nor Windows-1252"),
])
def test_unreadable_files_are_refused_with_the_reason(name: str, data: bytes, says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as caught:
        read_attachment(name, data)
    assert name in str(caught.value)


def test_a_file_over_the_size_limit_is_refused_with_both_sizes() -> None:
    with pytest.raises(InvalidInput, match=r"big.txt is 2.0 KB; files up to 1.0 KB can be attached"):
        read_attachment("big.txt", b"x" * 2048, max_bytes=1024)


def test_a_reader_that_runs_too_long_is_stopped() -> None:
    with pytest.raises(InvalidInput, match=r"slow.pdf cannot be read: reading it took longer than 0.01 s"):
        read_attachment("slow.pdf", make_pdf(["text"] * 50), timeout_s=0.01)


def test_names_lose_their_folders() -> None:
    assert clean_name("../../etc/passwd") == "passwd"
    assert clean_name("C:\\Users\\me\\report.pdf") == "report.pdf"
    assert clean_name("bad\x00name\n.txt") == "badname.txt"
    assert clean_name("") == "attachment"


def test_data_urls_as_the_api_sends_them() -> None:
    pdf = read_data_url("report.pdf", data_url(make_pdf(["Code 4417."]), "application/pdf"))
    assert (pdf.name, pdf.kind, pdf.text) == ("report.pdf", "pdf", "Code 4417.")
    unnamed = read_data_url(None, data_url(b"# Notes", "text/markdown"))
    assert (unnamed.name, unnamed.kind) == ("file.md", "markdown")  # the media type gives the extension
    with pytest.raises(InvalidInput, match="not valid base64"):
        read_data_url("a.txt", "data:text/plain;base64,@@@")
    with pytest.raises(InvalidInput, match="must be base64"):
        read_data_url("a.txt", "data:text/plain,hello")


# --- what the model reads ---------------------------------------------------------------------------------------


def test_each_file_is_a_fenced_block_under_its_name_before_the_typed_text() -> None:
    code = Attachment(name="a.py", kind="code", size=9, text="x = '```'\n")
    notes = Attachment(name="n.txt", kind="text", size=4, text="note")
    assert render_attachment(code) == "File: a.py\n````python\nx = '```'\n````"  # a fence longer than the text's
    assert message_text("Summarize.", [code, notes]) == (
        "File: a.py\n````python\nx = '```'\n````\n\nFile: n.txt\n```\nnote\n```\n\nSummarize.")


def test_attachments_are_kept_with_the_chat(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    notes = read_attachment("notes.txt", FACT.encode())
    chat = store.new("Assistant", [ChatMessage(role="user", content="Who keeps the light?", attachments=[notes])])
    again = store.load("Assistant", chat.id)
    assert again.messages[0].attachments == [notes]
    assert again.prompt_messages()[0]["attachments"] == [notes]
    files_only = store.new("Assistant", [ChatMessage(role="user", content="", attachments=[notes])])
    assert files_only.preview == "[notes.txt]"  # a message of files alone is listed by their names


# --- on the one chat path, with the starter model ------------------------------------------------------------------


def _prepare(services, messages, **params):
    name = services.manager.resident().name
    values = services.default_params(name).model_copy(update={"max_new_tokens": 64, **params})
    return prepare_chat(services, turn_request(services.settings.chat, values, messages, "send", model=name))


@pytest.mark.slow
def test_the_file_reaches_the_prompt_and_is_counted(services) -> None:
    notes = read_attachment("notes.txt", FACT.encode())
    question = "Who keeps the lighthouse?"
    bare = _prepare(services, [{"role": "user", "content": question}])
    with_file = _prepare(services, [{"role": "user", "content": question, "attachments": [notes]}])
    assert f"File: notes.txt\n```\n{FACT}\n```\n\n{question}" in with_file.prompt
    model = services.manager.require_model(None)
    assert with_file.prompt_tokens - bare.prompt_tokens >= model.token_count(FACT)


@pytest.mark.slow
def test_a_file_too_large_for_the_context_is_refused_with_the_numbers(services) -> None:
    model = services.manager.require_model(None)
    big = read_attachment("big.txt", ("lighthouse keeper " * (model.context_length // 2)).encode())
    with pytest.raises(AttachmentTooLarge) as caught:
        _prepare(services, [{"role": "user", "content": "Summarize.", "attachments": [big]}])
    error = caught.value
    assert isinstance(error, ContextLengthExceeded)  # the API's context_length_exceeded
    tokens = error.files["big.txt"]
    assert tokens == model.token_count(render_attachment(big)) > error.room > 0
    assert error.room == error.context - 64 - (error.prompt_tokens - tokens)
    message = str(error)
    assert f"big.txt: {tokens:,} tokens" in message and f"only {error.room:,} are left" in message
    assert "not cut" in message


@pytest.mark.slow
def test_older_files_are_left_out_whole_and_the_newest_kept(services) -> None:
    model = services.manager.require_model(None)
    old = read_attachment("old.txt", ("harbour log entry " * (model.context_length // 3)).encode())
    notes = read_attachment("notes.txt", FACT.encode())
    prepared = _prepare(services, [
        {"role": "user", "content": "Read this.", "attachments": [old]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "And this one: who keeps the light?", "attachments": [notes]},
    ], max_new_tokens=model.context_length // 2)
    assert prepared.dropped_messages == 2 and "harbour log" not in prepared.prompt
    assert FACT in prepared.prompt
