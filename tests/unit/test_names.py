"""The file-name sanitiser: traversal, controls, unicode, length, duplicates."""

from __future__ import annotations

import unicodedata

import pytest

from interpreter.files.names import FALLBACK, sanitize_path, sanitize_segment, unique_name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("report.csv", "report.csv"),
        ("My Report (2024).csv", "My Report (2024).csv"),  # kept as given: nothing here reaches a shell
        ("données élève.xlsx", "données élève.xlsx"),
        ("日本語 ✓ 🎉.txt", "日本語 ✓ 🎉.txt"),
        ("../../etc/passwd", "etc/passwd"),
        ("/etc/shadow", "etc/shadow"),
        ("a/./b/../c.txt", "a/b/c.txt"),
        ("..\\..\\windows\\win.ini", "windows/win.ini"),
        ("charts//plot.png", "charts/plot.png"),
        ("a\x00b.txt", "a_b.txt"),
        ("tab\there\nnewline.txt", "tab_here_newline.txt"),
        ("esc\x1b[31mred.txt", "esc_[31mred.txt"),
        ("c1\x85control\x9f.txt", "c1_control_.txt"),
        ("line\u2028sep.txt", "line_sep.txt"),
        (".env", ".env"),
        ("..", FALLBACK),
        ("", FALLBACK),
        ("/", FALLBACK),
        ("  padded  ", "padded"),
    ],
)
def test_sanitize_path(raw: str, expected: str) -> None:
    assert sanitize_path(raw) == expected


def test_single_uploads_keep_only_the_last_component() -> None:
    assert sanitize_path("../../secret/dir/name.txt", nested=False) == "name.txt"
    assert sanitize_path("../..", nested=False) == FALLBACK


def test_unicode_is_normalised_to_nfc() -> None:
    decomposed = unicodedata.normalize("NFD", "é.txt")
    assert decomposed != "é.txt"
    assert sanitize_path(decomposed) == "é.txt"


def test_long_names_are_cut_by_bytes_keeping_the_extension_and_staying_distinct() -> None:
    long_a = "a" * 300 + "1.csv"
    long_b = "a" * 300 + "2.csv"
    cut_a, cut_b = sanitize_segment(long_a), sanitize_segment(long_b)
    assert len(cut_a.encode()) <= 255
    assert cut_a.endswith(".csv")
    assert cut_a != cut_b
    wide = "日" * 200 + ".txt"  # 3 bytes each: the cut must not split a character
    cut = sanitize_segment(wide)
    assert len(cut.encode()) <= 255
    cut.encode().decode("utf-8")
    assert cut.endswith(".txt")
    assert len(sanitize_segment("x" * 100, max_bytes=40).encode()) <= 40


def test_every_component_of_a_nested_path_is_cut() -> None:
    path = sanitize_path("d" * 300 + "/" + "f" * 300)
    assert all(len(part.encode()) <= 255 for part in path.split("/"))


def test_duplicates_get_numbered() -> None:
    taken: set[str] = set()
    assert unique_name("data.csv", taken) == "data.csv"
    assert unique_name("data.csv", taken) == "data (2).csv"
    assert unique_name("data.csv", taken) == "data (3).csv"
    assert unique_name("dir/notes", taken) == "dir/notes"
    assert unique_name("dir/notes", taken) == "dir/notes (2)"
    assert unique_name(".env", taken) == ".env"
    assert unique_name(".env", taken) == ".env (2)"
    assert taken == {"data.csv", "data (2).csv", "data (3).csv", "dir/notes", "dir/notes (2)", ".env", ".env (2)"}
