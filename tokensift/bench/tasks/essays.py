"""The essays for the benchmark's haystacks: they live in :mod:`tokensift.data` (shipped data,
shared with the policies); these names stay importable from here."""

from tokensift.data import (  # noqa: F401  (re-exported)
    ESSAY_FOLDER, ESSAY_PACKAGE, ESSAY_SEPARATOR, SENTENCE_END, EssayStream, clean_essay, encode, essay_folder,
    essay_stream, essay_texts, essay_words,
)
