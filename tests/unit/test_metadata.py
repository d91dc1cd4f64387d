"""Class names and prompt templates: counts, format and exact strings.

The expected strings are those of the official ResiDual registry (``data_registry.py`` of
the authors' code), written out here by hand; nothing from the authors' code is imported.
``CLASSNAMES[name][i]`` is the name of our label ``i``.
"""
from __future__ import annotations

import pytest

from residual_exp.catalog import spec

from residual_exp.data import metadata

TEN = ["cifar10", "cifar100", "dtd", "eurosat", "gtsrb", "mnist", "resisc45",
       "stanford_cars", "sun397", "svhn"]
WITH_NAMES = TEN + ["imagenet"]

N_CLASSES = {"cifar10": 10, "cifar100": 100, "dtd": 47, "eurosat": 10, "gtsrb": 43,
             "mnist": 10, "resisc45": 45, "stanford_cars": 196, "sun397": 397, "svhn": 10,
             "imagenet": 1000}
N_TEMPLATES = {"cifar10": 18, "cifar100": 18, "dtd": 8, "eurosat": 3, "gtsrb": 3, "mnist": 1,
               "resisc45": 18, "stanford_cars": 8, "sun397": 2, "svhn": 1, "imagenet": 80,
               "image_folder": 1}

# (first class name, last class name, first template) per dataset
ENDS = {
    "cifar10": ("airplane", "truck", "a photo of a {}."),
    "cifar100": ("apple", "worm", "a photo of a {}."),
    "dtd": ("banded", "zigzagged", "a photo of a {} texture."),
    "eurosat": ("annual crop land", "lake or sea", "a centered satellite photo of {}."),
    "gtsrb": ("red and white circle 20 kph speed limit",
              "white circle with gray strike bar indicating no passing for trucks has ended",
              "a zoomed in photo of a {} traffic sign."),
    "mnist": ("0", "9", 'a photo of the number: "{}".'),
    "resisc45": ("airplane", "wetland", "satellite imagery of {}."),
    "stanford_cars": ("AM General Hummer SUV 2000", "smart fortwo Convertible 2012",
                      "a photo of a {}."),
    "sun397": ("abbey", "youth hostel", "a photo of a {}."),
    "svhn": ("0", "9", 'a photo of the number: "{}".'),
    "imagenet": ("tench", "toilet paper", "a bad photo of a {}."),
}

# (label, name) spot checks in our label order
SPOTS = {
    "cifar10": [(1, "automobile"), (8, "ship")],
    # official spellings: underscores kept, class 26 (crab) is "cra"
    "cifar100": [(1, "aquarium_fish"), (26, "cra"), (41, "lawn_mower"), (83, "sweet_pepper"),
                 (96, "willow_tree")],
    "dtd": [(5, "chequered"), (30, "polka-dotted"), (35, "spiralled")],
    # our labels = sorted EuroSAT folders
    "eurosat": [(1, "forest"), (2, "brushland or shrubland"), (3, "highway or road"),
                (4, "industrial buildings or commercial buildings"), (6, "permanent crop land"),
                (7, "residential buildings or homes or apartments"), (8, "river")],
    # label = official ClassId; the official typos "horizonal", "bicyle" kept
    "gtsrb": [(6, "end / de-restriction of 80 kph speed limit"), (14, "stop"),
              (17, "red circle with white horizonal stripe no entry"),
              (29, "red and white triangle with bicyle warning"),
              (40, "blue circle with white arrows indicating a traffic circle")],
    "mnist": [(5, "5")],
    "resisc45": [(2, "baseball diamond"), (35, "sea ice"), (43, "thermal power station")],
    "stanford_cars": [(1, "Acura RL Sedan 2012"),
                      (38, "Bentley Continental Supersports Conv. Convertible 2012"),
                      (170, "Nissan 240SX Coupe 1998"), (173, "Ram C/V Cargo Van Minivan 2012"),
                      (194, "Volvo XC90 SUV 2007")],
    # label = line of ClassName.txt; "jail/indoor" precedes "jail_cell" there
    "sun397": [(8, "apartment building outdoor"), (205, "jacuzzi indoor"),
               (206, "jail indoor"), (207, "jail cell"), (208, "jewelry shop"),
               (351, "theater indoor procenium"), (393, "wine cellar bottle storage")],
    "svhn": [(0, "0"), (1, "1")],
    "imagenet": [(1, "goldfish"), (21, "kite (bird of prey)")],
}


def test_registry_covers_every_dataset():
    assert set(metadata.CLASSNAMES) == set(WITH_NAMES)
    assert set(metadata.TEMPLATES) == set(WITH_NAMES) | {"image_folder"}


@pytest.mark.parametrize("name", WITH_NAMES)
def test_counts(name):
    assert len(metadata.CLASSNAMES[name]) == N_CLASSES[name]
    assert len(metadata.TEMPLATES[name]) == N_TEMPLATES[name]
    assert all(isinstance(c, str) and c == c.strip() and c for c in metadata.CLASSNAMES[name])


@pytest.mark.parametrize("name", sorted(metadata.TEMPLATES))
def test_every_template_has_one_slot(name):
    templates = metadata.TEMPLATES[name]
    assert len(set(templates)) == len(templates)
    for t in templates:
        assert t.count("{}") == 1 and t.count("{") == 1 and t.count("}") == 1, t
        assert t.format("x") == t.replace("{}", "x")


@pytest.mark.parametrize("name", WITH_NAMES)
def test_ends_and_spots(name):
    first, last, template = ENDS[name]
    names = metadata.CLASSNAMES[name]
    assert (names[0], names[-1], metadata.TEMPLATES[name][0]) == (first, last, template)
    for label, cname in SPOTS[name]:
        assert names[label] == cname, (name, label)


@pytest.mark.parametrize("name", TEN)
def test_no_duplicate_names(name):
    names = metadata.CLASSNAMES[name]
    assert len(set(names)) == len(names)


def test_imagenet_duplicates_are_the_official_ones():
    # CLIP's curated ImageNet names (and the official registry) repeat two names
    names = metadata.CLASSNAMES["imagenet"]
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert repeated == ["missile", "sunglasses"] and len(set(names)) == 998


def test_gtsrb_templates_have_no_quotes():
    assert metadata.TEMPLATES["gtsrb"] == (
        "a zoomed in photo of a {} traffic sign.",
        "a centered photo of a {} traffic sign.",
        "a close up photo of a {} traffic sign.",
    )


def test_exact_short_template_lists():
    assert metadata.TEMPLATES["eurosat"] == (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    )
    assert metadata.TEMPLATES["dtd"] == tuple(
        f"a photo of {a} {{}} {n}." for a in ("a", "the")
        for n in ("texture", "pattern", "thing", "object"))
    assert metadata.TEMPLATES["sun397"] == ("a photo of a {}.", "a photo of the {}.")
    assert metadata.TEMPLATES["mnist"] == metadata.TEMPLATES["svhn"] == (
        'a photo of the number: "{}".',)
    assert metadata.TEMPLATES["cifar10"] == metadata.TEMPLATES["cifar100"]
    assert metadata.TEMPLATES["cifar10"][8:10] == ("a photo of a big {}.", "a photo of the {}.")
    assert metadata.TEMPLATES["cifar10"][-1] == "a photo of the big {}."
    assert metadata.TEMPLATES["stanford_cars"][3] == "i love my {}!"
    assert metadata.TEMPLATES["stanford_cars"][-1] == "a photo of my old {}."
    assert metadata.TEMPLATES["resisc45"][:2] == ("satellite imagery of {}.",
                                                  "aerial imagery of {}.")
    assert metadata.TEMPLATES["resisc45"][-1] == "aerial view of the {}."
    assert metadata.TEMPLATES["imagenet"][-1] == "a tattoo of the {}."


def test_eurosat_names_follow_the_folders():
    # labels are the sorted folder names (torchvision ImageFolder); names go by folder
    assert metadata.EUROSAT_FOLDERS == tuple(sorted(metadata.EUROSAT))
    assert metadata.CLASSNAMES["eurosat"] == tuple(
        metadata.EUROSAT[f] for f in metadata.EUROSAT_FOLDERS)
    assert metadata.EUROSAT["HerbaceousVegetation"] == "brushland or shrubland"
    assert metadata.EUROSAT["SeaLake"] == "lake or sea"


def test_folder_lists_give_the_official_names():
    assert metadata.CLASSNAMES["resisc45"] == tuple(
        metadata.clean_classnames(metadata.RESISC45_FOLDERS))
    folders = metadata.SUN397_FOLDERS
    assert len(folders) == 397 and list(folders) == sorted(folders)     # ClassName.txt order
    assert folders[206:208] == ("jail/indoor", "jail_cell")
    assert metadata.CLASSNAMES["sun397"] == tuple(metadata.clean_classnames(folders))


def test_sources_name_the_official_registry():
    for name in TEN:
        for field in ("classnames", "templates"):
            assert metadata.OFFICIAL in spec("dataset", name)[field], (name, field)
    assert metadata.OFFICIAL == "official ResiDual registry (data_registry.py)"
