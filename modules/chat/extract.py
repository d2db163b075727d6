"""Text out of an attached file's bytes: PDF (pypdf), DOCX (python-docx), HTML (Beautiful Soup over the standard
library's html.parser) and plain text in its encoding. modules.chat.attachments decides the kind and bounds the
work; PDF and DOCX are read in a child process (`python -m modules.chat.extract KIND`, the bytes on stdin, JSON on
stdout) so a file built to make a parser loop or swell is stopped by a timeout and a memory cap, not left running
in the server.

Each extractor raises UnreadableFile with a sentence for the person when the bytes are not what they claim."""
from __future__ import annotations

import codecs
import io
import json
import re
import sys


class UnreadableFile(Exception):
    """The file is damaged, encrypted, or holds no text; the message says which."""


def decode_text(data: bytes) -> str:
    """The text of a text file: UTF-8 (with or without a BOM), UTF-16 with its BOM, else Windows-1252. Bytes that
    are none of these (a NUL byte outside UTF-16, or undecodable bytes) are refused as binary."""
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return _newlines(data.decode(encoding))
            except UnicodeDecodeError:
                raise UnreadableFile(f"it starts like {encoding.upper()} text but is not valid {encoding}") from None
    if b"\x00" in data:
        raise UnreadableFile("it holds binary data, not text")
    for encoding in ("utf-8", "cp1252"):
        try:
            return _newlines(data.decode(encoding))
        except UnicodeDecodeError:
            continue
    raise UnreadableFile("it is neither UTF-8 nor Windows-1252 text")


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def pdf_text(data: bytes) -> str:
    """The text layer of each page, pages apart by a blank line."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableFile("it is password-protected")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except UnreadableFile:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf raises many kinds (PdfReadError, ValueError...) on bad files
        raise UnreadableFile(f"it is not a readable PDF ({type(exc).__name__}: {exc})") from None
    text = "\n\n".join(page for page in pages if page)
    if not text.strip():
        raise UnreadableFile(f"its {len(pages)} page(s) hold no text layer (a scanned document?)")
    return text


def docx_text(data: bytes) -> str:
    """The body's paragraphs and tables in document order; a table row is its cells joined by ' | '."""
    from docx import Document
    from docx.table import Table

    try:
        document = Document(io.BytesIO(data))
        lines: list[str] = []
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                lines += [" | ".join(cell.text.strip() for cell in row.cells) for row in block.rows]
                lines.append("")
            else:
                lines.append(block.text)
    except Exception as exc:  # noqa: BLE001 - python-docx raises zipfile, lxml and KeyError errors on bad files
        raise UnreadableFile(f"it is not a readable DOCX ({type(exc).__name__}: {exc})") from None
    text = _squeeze("\n".join(lines))
    if not text:
        raise UnreadableFile("it holds no text")
    return text


#: Elements whose text is not the page's text.
_HIDDEN = ("script", "style", "noscript", "template", "head")


def html_text(data: bytes) -> str:
    """The page's visible text, one line per block; the title first when it has one."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_text(data), "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title is not None else ""
    for element in soup(_HIDDEN):
        element.decompose()
    body = _squeeze(soup.get_text("\n"))
    text = "\n\n".join(part for part in (title, body) if part)
    if not text:
        raise UnreadableFile("it holds no visible text")
    return text


def _squeeze(text: str) -> str:
    """Lines stripped of trailing spaces, no more than one blank line in a row."""
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


EXTRACTORS = {"pdf": pdf_text, "docx": docx_text}


def main() -> None:
    """Child process: read the file from stdin, write {"text": ...} or {"error": ...} to stdout. The memory cap is
    set here, before the parser runs (the parent passes it as the second argument, in bytes)."""
    kind, memory = sys.argv[1], int(sys.argv[2])
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ImportError, ValueError, OSError):  # no such limit on this system: the timeout still holds
        pass
    data = sys.stdin.buffer.read()
    try:
        answer = {"text": EXTRACTORS[kind](data)}
    except UnreadableFile as exc:
        answer = {"error": str(exc)}
    except MemoryError:
        answer = {"error": "reading it needs more memory than a file of its size should"}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()
