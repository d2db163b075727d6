"""Files attached to a chat message: text, Markdown, code, PDF, DOCX and HTML, read into text once, kept with the
message (modules.chat.history) and written into the message the model reads.

`read_attachment` takes a file's name and bytes (the Chat tab's upload, the API's base64 file part) and gives an
`Attachment`: its kind (by extension, checked against the bytes' magic), its size, and its text (modules.chat.extract,
PDF and DOCX in a child process with a timeout and a memory cap). Anything it cannot read is an InvalidInput that
says why. The chat path (modules.chat.request) renders a message's attachments into its text for the model
(`render_messages`: each file a fenced block under its name, before the typed text) and refuses, with
AttachmentTooLarge, files that do not fit the context, naming their tokens and the room left: a file is never cut.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modules.chat.extract import UnreadableFile, decode_text, html_text
from modules.errors import ContextLengthExceeded, InvalidInput

Kind = Literal["text", "markdown", "code", "pdf", "docx", "html"]

#: The largest file read, in bytes (a PDF of a few hundred pages; text far beyond any context).
MAX_FILE_BYTES = 32 * 1024 * 1024
#: The most text one file may give, in characters (about 500,000 tokens: more than any context holds).
MAX_TEXT_CHARS = 2_000_000
#: How long a PDF or DOCX may take to read, and the memory its reader may use.
EXTRACT_TIMEOUT_S = 60.0
EXTRACT_MEMORY_BYTES = 2 * 1024 ** 3

KIND_LABELS: dict[str, str] = {"text": "Text", "markdown": "Markdown", "code": "Code", "pdf": "PDF",
                               "docx": "DOCX", "html": "HTML"}

_TEXT = {".txt", ".text", ".log", ".csv", ".tsv", ".rst", ".org", ".tex", ".srt", ".vtt"}
_MARKDOWN = {".md", ".markdown", ".mdown", ".mkd"}
_HTML = {".html", ".htm", ".xhtml"}
#: Code files and the language name their fenced block carries.
_CODE = {
    ".py": "python", ".pyi": "python", ".ipynb": "json", ".js": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".jsx": "jsx", ".ts": "typescript", ".tsx": "tsx", ".json": "json", ".jsonl": "json",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".cfg": "ini", ".conf": "", ".env": "",
    ".xml": "xml", ".svg": "xml", ".css": "css", ".scss": "scss", ".less": "less", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".cs": "csharp", ".java": "java",
    ".kt": "kotlin", ".kts": "kotlin", ".scala": "scala", ".go": "go", ".rs": "rust", ".rb": "ruby",
    ".php": "php", ".pl": "perl", ".pm": "perl", ".lua": "lua", ".r": "r", ".jl": "julia", ".swift": "swift",
    ".m": "objectivec", ".dart": "dart", ".sh": "bash", ".bash": "bash", ".zsh": "zsh", ".fish": "fish",
    ".ps1": "powershell", ".bat": "bat", ".sql": "sql", ".hs": "haskell", ".ml": "ocaml", ".ex": "elixir",
    ".exs": "elixir", ".erl": "erlang", ".clj": "clojure", ".vue": "vue", ".svelte": "svelte",
    ".proto": "protobuf", ".graphql": "graphql", ".tf": "hcl", ".cmake": "cmake", ".mk": "makefile",
    ".dockerfile": "dockerfile", ".gradle": "groovy", ".groovy": "groovy", ".zig": "zig", ".nim": "nim",
    ".v": "verilog", ".vhd": "vhdl", ".asm": "asm", ".s": "asm", ".diff": "diff", ".patch": "diff",
}
#: Files named without an extension that are code.
_CODE_NAMES = {"makefile": "makefile", "dockerfile": "dockerfile", "cmakelists.txt": "cmake",
               "gemfile": "ruby", "rakefile": "ruby", "jenkinsfile": "groovy"}
#: Types named in a refusal, with what to do instead.
_REFUSED = {".doc": "an old Word document: save it as .docx", ".rtf": "RTF: save it as .docx or text",
            ".odt": "an OpenDocument text: save it as .docx", ".xlsx": "a spreadsheet: save it as .csv",
            ".xls": "a spreadsheet: save it as .csv", ".pptx": "a presentation: save it as PDF",
            ".epub": "an e-book"}
SUPPORTED = ("text, Markdown, code (.py, .js, .json, ...), PDF, DOCX and HTML files")
#: Extensions an upload picker offers (the others are read when their bytes are text).
ACCEPTED_EXTENSIONS = sorted({*_TEXT, *_MARKDOWN, *_HTML, *_CODE, ".pdf", ".docx"})


class Attachment(BaseModel):
    """One attached file as the chat keeps it: its name (without folders), kind, size in bytes of the file as
    sent, and the text read from it (what the model reads; the file itself is not kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=255)
    kind: Kind
    size: int = Field(ge=0)
    text: str

    @property
    def label(self) -> str:
        """"notes.pdf (PDF, 12.3 KB)", as the Chat tab shows it."""
        return f"{self.name} ({KIND_LABELS[self.kind]}, {format_size(self.size)})"

    @property
    def language(self) -> str:
        """The language name of its fenced block."""
        if self.kind == "markdown":
            return "markdown"
        if self.kind != "code":
            return ""
        name = self.name.lower()
        return _CODE_NAMES.get(name) or _CODE.get(PurePosixPath(name).suffix, "")


class AttachmentTooLarge(ContextLengthExceeded):
    """Attached files that do not fit the context even with everything else of the prompt as small as it gets:
    `file_tokens` per file name and `room`, the tokens left for them. The API reports it as
    context_length_exceeded, as for any prompt too long."""

    def __init__(self, *, files: dict[str, int], room: int, context: int, others: int, max_new_tokens: int):
        InvalidInput.__init__(self, _too_large_message(files, room, context, others, max_new_tokens),
                              field="messages")
        self.files, self.room = files, room
        self.context, self.max_new_tokens, self.exact = context, max_new_tokens, True
        self.prompt_tokens = others + sum(files.values())


def _too_large_message(files: dict[str, int], room: int, context: int, others: int, max_new_tokens: int) -> str:
    total = sum(files.values())
    named = "; ".join(f"{name}: {tokens:,} tokens" for name, tokens in files.items())
    which = "The attached file" if len(files) == 1 else "The attached files"
    return (f"{which} need {total:,} tokens ({named}) but only {max(room, 0):,} are left for them: the model's "
            f"context is {context:,} tokens, the rest of the prompt takes {others:,} and the reply may take "
            f"{max_new_tokens:,} (max_new_tokens). Attach a shorter file (or the part that matters), load the model "
            "with a longer context, or lower max_new_tokens. The file was not cut.")


def format_size(size: int) -> str:
    """Bytes as people read them: 512 B, 12.3 KB, 4.0 MB."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def clean_name(name: str | None, fallback: str = "attachment") -> str:
    """The file's own name, without any folders a client put before it (Windows or POSIX), nor control
    characters."""
    base = PureWindowsPath(PurePosixPath(name or "").name).name
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()
    return base[:255] or fallback


def detect_kind(name: str, data: bytes) -> Kind:
    """The kind of file `name` with the bytes `data`: by its extension, checked against the bytes (a PDF starts
    with %PDF-, a DOCX is a ZIP holding word/document.xml); a name with an unknown extension is text when its
    bytes are. Raises InvalidInput for what cannot be read."""
    lower = name.lower()
    suffix = PurePosixPath(lower).suffix
    is_pdf = b"%PDF-" in data[:1024]
    is_zip = data[:4] == b"PK\x03\x04"
    if suffix == ".pdf" or (is_pdf and suffix not in _TEXT | _MARKDOWN | _HTML | set(_CODE)):
        if not is_pdf:
            raise InvalidInput(f"{name} is not a PDF: it does not start with %PDF-.", field="attachments")
        return "pdf"
    if suffix == ".docx" or is_zip:
        if not is_zip or b"word/document.xml" not in data:
            what = "not a DOCX (a Word document is a ZIP holding word/document.xml)" if suffix == ".docx" \
                else "a ZIP archive, not a document"
            raise InvalidInput(f"{name} is {what}. Attach {SUPPORTED}.", field="attachments")
        return "docx"
    if suffix in _REFUSED:
        raise InvalidInput(f"{name} is {_REFUSED[suffix]}; attach {SUPPORTED}.", field="attachments")
    if suffix in _MARKDOWN:
        return "markdown"
    if suffix in _HTML:
        return "html"
    if suffix in _CODE or lower in _CODE_NAMES:
        return "code"
    if suffix in _TEXT:
        return "text"
    head = data[:4096]
    if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InvalidInput(f"{name} is a binary file that cannot be read as text; attach {SUPPORTED}.",
                           field="attachments")
    if re.match(rb"\s*(<!doctype html|<html)", head, re.IGNORECASE):
        return "html"
    return "text"


def read_attachment(name: str, data: bytes, *, timeout_s: float = EXTRACT_TIMEOUT_S,
                    max_bytes: int = MAX_FILE_BYTES) -> Attachment:
    """The attachment of file `name` holding `data`, its text read out. Refuses (InvalidInput, naming the file and
    why) an empty file, one over `max_bytes`, an unsupported or damaged one, one with no text, one whose reader runs
    past `timeout_s` or its memory cap, and one whose text is over MAX_TEXT_CHARS."""
    name = clean_name(name)
    if len(data) > max_bytes:
        raise InvalidInput(f"{name} is {format_size(len(data))}; files up to {format_size(max_bytes)} can be "
                           "attached.", field="attachments")
    if not data:
        raise InvalidInput(f"{name} is empty.", field="attachments")
    kind = detect_kind(name, data)
    try:
        if kind in ("pdf", "docx"):
            text = _extract_in_child(kind, data, timeout_s)
        elif kind == "html":
            text = html_text(data)
        else:
            text = decode_text(data)
    except UnreadableFile as exc:
        raise InvalidInput(f"{name} cannot be read: {exc}.", field="attachments") from None
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidInput(f"{name} holds {len(text):,} characters of text; up to {MAX_TEXT_CHARS:,} can be "
                           "attached (more than any model's context).", field="attachments")
    if kind in ("text", "markdown", "code") and not text.strip():
        raise InvalidInput(f"{name} holds only white space.", field="attachments")
    return Attachment(name=name, kind=kind, size=len(data), text=text)


_ROOT = Path(__file__).resolve().parents[2]


def _extract_in_child(kind: str, data: bytes, timeout_s: float) -> str:
    """Run modules.chat.extract on `data` in a child process, bounded by `timeout_s` and EXTRACT_MEMORY_BYTES."""
    command = [sys.executable, "-m", "modules.chat.extract", kind, str(EXTRACT_MEMORY_BYTES)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=timeout_s, cwd=_ROOT, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        raise UnreadableFile(f"reading it took longer than {timeout_s:g} s") from None
    try:
        answer = json.loads(done.stdout.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("text") or answer.get("error"), str):
        why = "it needs more memory than allowed" if done.returncode < 0 or b"MemoryError" in done.stderr \
            else f"its reader failed (exit status {done.returncode})"
        raise UnreadableFile(why)
    if "error" in answer:
        raise UnreadableFile(answer["error"])
    return answer["text"]


def read_data_url(name: str | None, url: str, *, what: str = "file_data") -> Attachment:
    """The attachment a base64 data URL ("data:application/pdf;base64,...") or bare base64 holds, as the API's
    file parts send it. The media type names an extension when `name` has none."""
    media = ""
    payload = url
    match = re.match(r"data:([^;,]*)((?:;[^;,]*)*),", url)
    if match:
        media, payload = match.group(1).lower(), url[match.end():]
        if ";base64" not in match.group(2):
            raise InvalidInput(f"{what} must be base64 (data:<media type>;base64,...).", field=what)
    if len(payload) > MAX_FILE_BYTES * 4 // 3 + 8:
        raise InvalidInput(f"The file is over {format_size(MAX_FILE_BYTES)}, the most that can be attached.",
                           field=what)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64.", field=what) from None
    try:
        return read_attachment(with_extension(clean_name(name, "file"), media), data)
    except InvalidInput as exc:
        exc.field = what  # the request's field that carried the file
        raise


#: Media types and the extension that tells a file's kind when its name has none.
_MEDIA_EXTENSIONS = {"application/pdf": ".pdf", "text/plain": ".txt", "text/markdown": ".md",
                     "text/html": ".html", "text/csv": ".csv", "application/json": ".json",
                     "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx"}


def with_extension(name: str, media_type: str) -> str:
    """`name`, with the extension of `media_type` added when the name has no known one."""
    suffix = PurePosixPath(name.lower()).suffix
    if suffix in ACCEPTED_EXTENSIONS or media_type not in _MEDIA_EXTENSIONS:
        return name
    return name + _MEDIA_EXTENSIONS[media_type]


# --- what the model reads ---------------------------------------------------------------------------------------


def render_attachment(attachment: Attachment) -> str:
    """One file as the model reads it: its name, then its text in a fenced block (a fence longer than any run of
    backticks in the text)."""
    return f"File: {attachment.name}\n{fenced(attachment.text.rstrip(), attachment.language)}"


def fenced(text: str, language: str = "") -> str:
    """`text` in a Markdown fenced block whose fence is longer than any run of backticks in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def message_text(content: str, attachments: list[Attachment]) -> str:
    """The text of a message with files: each file's block, then what the person typed."""
    blocks = [render_attachment(a) for a in attachments]
    return "\n\n".join([*blocks, content] if content else blocks)


def attachments_of(message: dict[str, Any]) -> list[Attachment]:
    """The attachments a message dict carries (Attachment objects or their dicts), under "attachments"."""
    return [a if isinstance(a, Attachment) else Attachment.model_validate(a) for a in message.get("attachments") or []]


def render_messages(messages: list[dict[str, Any]], *, include: bool = True) -> list[dict[str, Any]]:
    """The messages with their attachments written into their text (`include` False: left out), the
    "attachments" key removed. Content given as parts gets the files as a text part before them."""
    rendered = []
    for message in messages:
        if "attachments" not in message:
            rendered.append(message)
            continue
        files = attachments_of(message) if include else []
        message = {key: value for key, value in message.items() if key != "attachments"}
        content = message.get("content") or ""
        if files and isinstance(content, list):
            message["content"] = [{"type": "text", "text": message_text("", files) + "\n\n"}, *content]
        elif files:
            message["content"] = message_text(content, files)
        rendered.append(message)
    return rendered


def take_file_parts(content: list[dict[str, Any]], *, field: str = "messages") -> tuple[list[dict[str, Any]],
                                                                                       list[Attachment]]:
    """OpenAI content parts with their file parts (`{"type": "file", "file": {"filename", "file_data"}}`, the
    data a base64 data URL) read as attachments: (the other parts, the files). A file_id names an upload this
    server does not keep: refused, as is a file part without its data."""
    rest: list[dict[str, Any]] = []
    files: list[Attachment] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "file":
            rest.append(part)
            continue
        file = part.get("file") if isinstance(part.get("file"), dict) else {}
        data = file.get("file_data")
        if not isinstance(data, str) or not data:
            why = ("file_id is not supported: this server keeps no uploaded files" if file.get("file_id")
                   else "it has no file.file_data")
            raise InvalidInput(f"A file content part cannot be read: {why}. Send the file inline as "
                               "file.file_data, a data URL (data:application/pdf;base64,...), with file.filename.",
                               field=field)
        name = file.get("filename") if isinstance(file.get("filename"), str) else None
        files.append(read_data_url(name, data, what=field))
    return rest, files
