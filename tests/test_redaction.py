"""Secrets in error messages (supervision.errors): credential fields go whole, and a known
secret withholds the whole detail, so an echoed guess is never confirmed with its position."""

from __future__ import annotations

from supervision.errors import WITHHELD, operation_message, redact

SECRET = "Hunter2-very-secret"


def test_dsn_credentials_and_password_fields_are_redacted_whatever_their_value() -> None:
    for password in (SECRET, "wrong-guess"):
        text = redact(f"cannot reach postgresql://admin:{password}@db:5432/qdb; "
                      f"password={password} rejected", (SECRET,))
        assert password not in text and "admin" not in text
        assert text == "cannot reach postgresql://***@db:5432/qdb; password=*** rejected"


def test_a_known_secret_withholds_the_whole_detail() -> None:
    message = operation_message("symbol_info_tick", f"unexpected argument(s) xx{SECRET}yy",
                                (SECRET,))
    assert message == f"symbol_info_tick failed: {WITHHELD}"
    assert "xx" not in message and "yy" not in message and SECRET not in message


def test_text_without_a_secret_is_unchanged() -> None:
    message = operation_message("fetch", 'relation "missing" does not exist', (SECRET,))
    assert message == 'fetch failed: relation "missing" does not exist'


def test_an_empty_secret_withholds_nothing() -> None:
    assert redact("plain text", ("",)) == "plain text"
