"""Every script's flags, defaults and choices are pinned in tests/cli_flags.json: a change
to a flag is a change to the scripts' interface and must show up here (update the JSON with
`python tests/fingerprint.py OUT.json` and copy its "cli" entry)."""
import json
from pathlib import Path

import pytest

from fingerprint import cli_flags

PINNED = json.loads((Path(__file__).parent / "cli_flags.json").read_text())


@pytest.fixture(scope="module")
def current():
    return json.loads(json.dumps(cli_flags()))


@pytest.mark.parametrize("script", sorted(PINNED["flags"]))
def test_every_flag_keeps_its_name_default_and_choices(current, script):
    assert current["flags"][script] == PINNED["flags"][script]


def test_presets_keep_their_values(current):
    assert current["presets"] == PINNED["presets"]
