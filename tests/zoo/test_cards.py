"""Every zoo folder carries its model card (README.md), written from its config.json and zoo.json by
`python -m difflab.card`; a card that no longer matches its record fails here."""

import json

import pytest

from difflab.card import model_card
from difflab.zoo import ZOO_DIR, names


@pytest.mark.parametrize("name", names())
def test_every_zoo_folder_has_its_current_card(name):
    folder = ZOO_DIR / name
    config = json.loads((folder / "config.json").read_text())
    zoo = json.loads((folder / "zoo.json").read_text())
    card = (folder / "README.md").read_text()
    assert card == model_card(config, zoo, name=name), f"run: python -m difflab.card {folder}"
    for section in ("## Data", "## Recipe", "## Metrics", "## Licence", "## Limits"):
        assert section in card
    assert zoo["command"] in card and f"n = {zoo['eval']['n']} samples" in card
    assert all(note in card for note in zoo.get("notes", []))  # what the record says of itself


def test_a_card_names_the_data_licence_and_the_classes():
    card = (ZOO_DIR / "fmnist-unet-s" / "README.md").read_text()
    assert "Fashion-MNIST" in card and "Licence: MIT" in card and "9 Ankle boot" in card
    card = (ZOO_DIR / "digits-unet-s" / "README.md").read_text()
    assert "CC BY 4.0" in card and "An unconditional diffusion model" in card
