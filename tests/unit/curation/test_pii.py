"""Personal data: redacted by default, rejected or kept on request."""

from sft_pipeline.curation.clean import clean_instructions
from sft_pipeline.curation.config import CurationConfig
from sft_pipeline.curation.pii import find_pii, redact_pii
from tests.unit.curation.samples import frame, reasons_by_index, row


def test_pii_is_redacted_by_default_and_rejected_on_request():
    text = "Mail jane.doe+work@example.co.uk or call +1 (555) 123-4567 or 020 7946 0958."
    redacted, counts = redact_pii(text)
    assert redacted == "Mail [EMAIL] or call [PHONE] or [PHONE]."
    assert counts == {"email": 1, "phone": 2}
    # Dates, versions, prices, IPs and short numbers are not phone numbers.
    assert find_pii("On 2023-01-15 v1.2.3 cost $1,234.56 from 192.168.1.10, code 555-1234, 10.000.000 rows") == {}
    rows = frame(row("My email is bob@corp.com, fix my account.", "Done, bob@corp.com is updated.", index=1), row("Hi", "Hello there.", index=2))
    kept, rejected, report = clean_instructions(rows, CurationConfig())
    assert kept.iloc[0]["prompt"] == "My email is [EMAIL], fix my account." and "[EMAIL]" in kept.iloc[0]["response"]
    assert report.redactions == {"email": 2}
    kept, rejected, _ = clean_instructions(rows, CurationConfig(pii="reject"))
    assert reasons_by_index(rejected) == {1: "pii"} and "2 email" in rejected.iloc[0]["detail"]
    kept, _, _ = clean_instructions(rows, CurationConfig(pii="keep"))
    assert "bob@corp.com" in kept.iloc[0]["prompt"]


def test_rejected_rows_keep_their_raw_text_without_the_personal_data_unless_pii_is_kept():
    from sft_pipeline.curation.pii import redact_value

    rows = frame(row("Write to bob@corp.com at 555-867-5309 as his bank.", "I'm sorry, but I can't help with that request.", index=1),
                 row("Hi", "Hello there.", index=2))
    for pii in ("redact", "reject"):
        _, rejected, _ = clean_instructions(rows, CurationConfig(pii=pii))
        raw = rejected.set_index("source_index").loc[1, "raw"]
        assert "bob@corp.com" not in raw and "555-867-5309" not in raw and "[EMAIL]" in raw, pii
    _, rejected, _ = clean_instructions(rows, CurationConfig(pii="keep"))
    assert "bob@corp.com" in rejected.set_index("source_index").loc[1, "raw"]
    observed = {"unexpected_count": 1, "sample": ["call 555-867-5309", ("a@b.org",)], "n": 3}
    assert redact_value(observed) == {"unexpected_count": 1, "sample": ["call [PHONE]", ("[EMAIL]",)], "n": 3}
