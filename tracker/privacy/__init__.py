"""The privacy lifecycle: recipient keys and pseudonyms, opt-out, erasure and export,
retention, the privacy notice, and the coordination that makes a change hold in every
worker at once."""
