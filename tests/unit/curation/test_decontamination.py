"""Decontamination: rows sharing a benchmark n-gram are rejected, hash hits confirmed."""

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.curation.decontamination import find_contaminated
from tests.unit.curation.samples import frame, row


def test_decontamination_rejects_rows_sharing_a_benchmark_ngram():
    question = "Which planet in the solar system has the largest number of confirmed moons orbiting around it as of today"
    rows = frame(row(f"Quiz: {question}?", "Saturn.", index=1), row("Name a gas giant.", "Jupiter.", index=2))
    kept, rejected, _ = clean_instructions(rows, CurationConfig(), benchmark_texts=[("q-42", question + "\nA. Mars")])
    assert list(kept["source_index"]) == [2]
    assert rejected.iloc[0]["reason"] == "benchmark_contamination"
    assert "q-42" in rejected.iloc[0]["detail"]
    kept, rejected, _ = clean_instructions(rows, CurationConfig(decontamination_ngram=0), benchmark_texts=[("q-42", question)])
    assert len(kept) == 2


def test_decontamination_hash_hits_are_confirmed_and_name_the_item():
    question = "which of the following best describes the main function of mitochondria in a eukaryotic cell"
    choices = "A. energy production\nB. protein synthesis\nC. lipid storage\nD. cell division"
    texts = [f"Quiz time: {question}?", "Tell me about cells.", f"Options were {choices.lower()} and more words here to reach thirteen"]
    hits = find_contaminated(texts, [("mmlu-7", question + "\n" + choices)], 13)
    assert set(hits) == {0} and hits[0][0] == "mmlu-7"
    hits = find_contaminated(texts, [("mmlu-7", question + "\n" + choices)], 8)
    assert set(hits) == {0, 2}
    assert find_contaminated(texts, [], 13) == {}
