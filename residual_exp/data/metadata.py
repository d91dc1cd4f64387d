"""Class names and prompt templates, CLIP-paper style, for every registered dataset.

Templates are format strings with one ``{}`` (the class name).  Class names are readable
("aquarium fish", not ``aquarium_fish``).  Where a maintained source exists we take it
from there at import time (open_clip's ImageNet metadata) or from the torchvision dataset
object (``.classes``, cleaned with :func:`clean_classname`); the short lists written out
below are the ones torchvision does not carry.  ``SOURCES`` records, per dataset, where the
class names and the templates come from.

The CLIP paper's prompts (Radford et al. 2021) are published with the paper's code in the
openai/CLIP repository, ``data/prompts.md``; "CLIP prompts.md" below refers to that file.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Iterable

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

# --------------------------------------------------------------------------- templates

_CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

_DTD_TEMPLATES = tuple(
    f"a photo of {article} {{}} {noun}."
    for article in ("a", "the") for noun in ("texture", "pattern", "thing", "object")
)

_EUROSAT_TEMPLATES = (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)

_GTSRB_TEMPLATES = (
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
)

_NUMBER_TEMPLATES = ('a photo of the number: "{}".',)

_RESISC45_TEMPLATES = tuple(
    f"{kind} {view} of {article}{{}}."
    for article in ("", "a ", "the ")
    for view in ("imagery", "photo", "view")
    for kind in ("satellite", "aerial")
)

_CARS_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

_SUN397_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")

# open_clip stores its ImageNet templates as one-argument lambdas; turn them into strings
_IMAGENET_TEMPLATES = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)

DEFAULT_TEMPLATES = ("a photo of a {}.",)

TEMPLATES: MappingProxyType = MappingProxyType({
    "cifar10": _CIFAR_TEMPLATES,
    "cifar100": _CIFAR_TEMPLATES,
    "dtd": _DTD_TEMPLATES,
    "eurosat": _EUROSAT_TEMPLATES,
    "gtsrb": _GTSRB_TEMPLATES,
    "mnist": _NUMBER_TEMPLATES,
    "resisc45": _RESISC45_TEMPLATES,
    "stanford_cars": _CARS_TEMPLATES,
    "sun397": _SUN397_TEMPLATES,
    "svhn": _NUMBER_TEMPLATES,
    "imagenet": _IMAGENET_TEMPLATES,
    "image_folder": DEFAULT_TEMPLATES,
})

# ------------------------------------------------------------------------- class names

DIGITS = tuple(str(d) for d in range(10))          # MNIST and SVHN, label d is digit d

IMAGENET = tuple(IMAGENET_CLASSNAMES)              # index = position of the wnid in sorted order

# GTSRB: index = official ClassId (0..42).  Readable descriptions from CLIP prompts.md.
GTSRB = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

# EuroSAT: folder name (torchvision's ``.classes``) -> readable name from CLIP prompts.md
EUROSAT = MappingProxyType({
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
})

# RESISC45: the 45 class folders of NWPU-RESISC45 (label = position); readable names are
# these with underscores turned into spaces, which is exactly the CLIP prompts.md list.
RESISC45_FOLDERS = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge",
    "chaparral", "church", "circular_farmland", "cloud", "commercial_area",
    "dense_residential", "desert", "forest", "freeway", "golf_course", "ground_track_field",
    "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace",
    "parking_lot", "railway", "railway_station", "rectangular_farmland", "river",
    "roundabout", "runway", "sea_ice", "ship", "snowberg", "sparse_residential", "stadium",
    "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
)


def clean_classname(raw: str) -> str:
    """Folder/identifier-style class name -> readable CLIP-style name.

    ``aquarium_fish`` -> ``aquarium fish``; SUN397's ``apartment_building/outdoor`` ->
    ``apartment building outdoor`` (the CLIP prompts.md form); surrounding space dropped.
    """
    return " ".join(raw.replace("_", " ").replace("/", " ").split())


def clean_classnames(raw: Iterable[str]) -> list[str]:
    return [clean_classname(c) for c in raw]


# ----------------------------------------------------------------------------- sources

_TV = "torchvision dataset object's `.classes`"
SOURCES: MappingProxyType = MappingProxyType({
    "cifar10": {
        "classnames": f"{_TV} (from the CIFAR-10 batches.meta), same as CLIP prompts.md",
        "templates": "CLIP prompts.md, CIFAR-10 (18 templates)"},
    "cifar100": {
        "classnames": f"{_TV} (CIFAR-100 meta, fine labels), underscores -> spaces; "
                      "same as CLIP prompts.md",
        "templates": "CLIP prompts.md, CIFAR-100 (18 templates)"},
    "dtd": {
        "classnames": f"{_TV} (DTD image folders); same as CLIP prompts.md",
        "templates": "CLIP prompts.md, DescribableTextures (8 templates)"},
    "eurosat": {
        "classnames": "metadata.EUROSAT (folder name -> readable), copied from CLIP prompts.md",
        "templates": "CLIP prompts.md, EuroSAT (3 templates)"},
    "gtsrb": {
        "classnames": "metadata.GTSRB (ClassId -> description), copied from CLIP prompts.md",
        "templates": "CLIP prompts.md, GTSRB (3 templates)"},
    "mnist": {
        "classnames": "digits '0'..'9' as in CLIP prompts.md (torchvision's '0 - zero' form "
                      "is not used)",
        "templates": "CLIP prompts.md, MNIST (1 template)"},
    "resisc45": {
        "classnames": "metadata.RESISC45_FOLDERS (the dataset's 45 folders), underscores -> "
                      "spaces; identical to CLIP prompts.md",
        "templates": "CLIP prompts.md, RESISC45 (18 templates)"},
    "stanford_cars": {
        "classnames": f"{_TV} (devkit cars_meta.mat), used as is, as in CLIP prompts.md",
        "templates": "CLIP prompts.md, StanfordCars (8 templates)"},
    "sun397": {
        "classnames": f"{_TV} (SUN397 ClassName.txt), '/' and '_' -> spaces, which gives "
                      "the CLIP prompts.md names",
        "templates": "CLIP prompts.md, SUN397 (2 templates)"},
    "svhn": {
        "classnames": "digits '0'..'9' (torchvision maps the .mat label 10 to digit 0)",
        "templates": "the MNIST template of CLIP prompts.md (CLIP did not evaluate SVHN); "
                     "the task-vectors code base uses the same one"},
    "imagenet": {
        "classnames": "open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES (CLIP's curated "
                      "names, indexed by sorted WordNet id)",
        "templates": "open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES (CLIP's 80)"},
    "image_folder": {
        "classnames": "the user's class folder names, underscores -> spaces",
        "templates": "dataset.params.templates if given, else ('a photo of a {}.',)"},
})

assert len(GTSRB) == 43 and len(RESISC45_FOLDERS) == 45 and len(EUROSAT) == 10
assert len(_DTD_TEMPLATES) == 8 and len(_RESISC45_TEMPLATES) == 18 and len(_IMAGENET_TEMPLATES) == 80
assert set(TEMPLATES) == set(SOURCES)
