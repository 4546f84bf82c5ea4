"""Single source of truth for class lists, palettes, label-id tables and normalisation constants."""

from __future__ import annotations

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = len(CITYSCAPES_CLASSES)

# RGB colour of each train id (Cityscapes palette).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Cityscapes (and GTA5, which uses the Cityscapes label ids) label id -> train id. Every other id -> 255.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
GTA_ID_TO_TRAINID = CITYSCAPES_ID_TO_TRAINID

# SYNTHIA-RAND-CITYSCAPES raw id -> train id (terrain 9, truck 14 and train 16 never occur in SYNTHIA).
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
    18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}

# Evaluation subsets of the SYNTHIA protocol (train ids).
SYNTHIA_16_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13_CLASSES: tuple[int, ...] = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

# ImageNet feature distance is applied on these "thing" classes (traffic light ... bicycle).
THING_CLASSES: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# The order in which the reference walks classes when it updates the instance bank ("rare_seq").
RARE_CLASS_ORDER: tuple[int, ...] = (18, 12, 17, 16, 7, 6, 11, 15, 4, 5, 14, 3, 9, 13, 8, 1, 10, 2, 0)

# ImageNet normalisation on the 0..255 RGB scale, as in the mmseg configs (to_rgb=True).
IMG_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMG_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


def class_names(num_classes: int) -> list[str]:
    """The Cityscapes class names for the 19-class setting, ``class_<i>`` otherwise."""
    if num_classes == NUM_CLASSES:
        return list(CITYSCAPES_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]
