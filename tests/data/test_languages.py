"""Language detection shared by ShareGPT cleaning and stats: a clear error without lingua, codes checked against
lingua's own list, and real sentences detected as ISO 639-1 codes, in order, across batches."""

import sys

import pytest

from camelid.data import languages
from camelid.data.languages import UNKNOWN, check_languages, detect_languages, known_languages, language_detector
from camelid.errors import CamelidError

SENTENCES = {
    "en": "How do I bake sourdough bread at home without a proofing basket?",
    "fr": "Comment puis-je apprendre à programmer en Python rapidement ?",
    "de": "Wie funktioniert eigentlich ein Elektromotor?",
    "es": "¿Cuál es la capital de Australia y por qué no es Sídney, la ciudad más grande del país?",
    "zh": "请解释一下量子计算的基本原理。",
    "ru": "Как работает двигатель внутреннего сгорания?",
    "ja": "東京でおすすめの観光地を教えてください。",
}


def test_without_lingua_each_entry_point_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lingua", None)  # as if not installed: importing it raises ImportError
    message = "language detection needs lingua: pip install 'camelid[lang]'"
    for call in (known_languages, lambda: check_languages(["en"]), language_detector,
                 lambda: language_detector(["en", "fr"])):
        with pytest.raises(CamelidError) as error:
            call()
        assert str(error.value) == message


def test_codes_are_checked_against_the_languages_lingua_detects():
    lingua = pytest.importorskip("lingua")
    known = known_languages()
    assert known == sorted(lang.iso_code_639_1.name.lower() for lang in lingua.Language.all_spoken_ones())
    assert {"en", "fr", "zh"} <= set(known) and "la" not in known  # Latin is known to lingua, but never spoken
    assert check_languages([" EN", "fr", "en", ""]) == ["en", "fr"]
    assert check_languages("De") == ["de"]
    with pytest.raises(CamelidError, match=r"^unknown language code 'english'; use ISO 639-1 codes: .*\ben\b"):
        check_languages(["en", "english"])
    with pytest.raises(CamelidError, match="unknown language code 'la'"):
        check_languages(["la"])
    with pytest.raises(CamelidError, match="^no language given"):
        check_languages([" ", ""])
    with pytest.raises(CamelidError, match="unknown language code 'xx'"):
        language_detector(["en", "xx"])


@pytest.mark.parametrize("low_accuracy", [False, True])
def test_real_sentences_are_detected_as_codes_in_order_across_batches(monkeypatch, low_accuracy):
    pytest.importorskip("lingua")
    monkeypatch.setattr(languages, "BATCH", 3)  # 8 texts: three parallel calls, the last one short
    texts = list(SENTENCES.values()) + ["?!"]
    expected = list(SENTENCES) + [UNKNOWN]
    assert detect_languages(language_detector(low_accuracy=low_accuracy), texts) == expected
    assert detect_languages(language_detector(list(SENTENCES), low_accuracy=low_accuracy), texts) == expected
    assert detect_languages(language_detector(), []) == []


def test_a_detector_for_some_languages_answers_only_with_those():
    pytest.importorskip("lingua")
    detector = language_detector(["en", "de"])
    found = detect_languages(detector, [SENTENCES["en"], SENTENCES["de"], SENTENCES["fr"], SENTENCES["es"]])
    assert found[:2] == ["en", "de"] and set(found) <= {"en", "de", UNKNOWN}


def test_language_codes_are_a_comma_separated_list_or_all():
    from camelid.data.languages import parse_language_codes

    assert parse_language_codes(" en, fr,,de ") == ["en", "fr", "de"]
    assert parse_language_codes("all") is True
