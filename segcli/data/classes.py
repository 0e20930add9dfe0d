"""Class names and palettes of the standard datasets — the one place these facts live.

The order of every tuple is the order of the class ids in the converted masks (after the
dataset's label mapping), as MMSegmentation's dataset classes and converters define them:

* ADE20K (SceneParse150): 150 classes; raw masks store 1..150 with 0 = "other", which
  ``reduce_zero_label`` maps to 255 (ignored) and shifts the rest down by one.
* Cityscapes: the 19 train ids of ``*_gtFine_labelTrainIds.png`` (255 = ignore).
* Pascal Context: 60 classes with "background" first (as written by MMSegmentation's converter);
  the 59-class variant drops "background" (raw 0 -> 255, the rest -1).
* COCO-Stuff-10K: 171 classes (80 things, then 91 stuff); MMSegmentation's converter writes
  1..171 with 0 = unlabeled, so this set also uses ``reduce_zero_label``.

Palettes: Cityscapes uses its official colours. The big sets get a deterministic colour map
(:func:`label_colormap`, the bit-interleaving scheme of the Pascal VOC development kit) indexed
by the *raw* mask id, so a class keeps its colour whether or not its dataset drops class 0
(Pascal Context 59's palette is Pascal Context 60's without "background").
"""
from __future__ import annotations

import numpy as np

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# The Cityscapes label id of each of the 19 train ids (cityscapesScripts' helpers/labels.py): what the
# benchmark server reads (MMSegmentation's ``CityscapesDataset.results2img`` converts the same way).
CITYSCAPES_LABEL_IDS: tuple[int, ...] = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# The official Cityscapes colours of the 19 train ids (cityscapesScripts' labels.py).
CITYSCAPES_PALETTE = np.array(
    [
        [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
        [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
        [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
        [0, 80, 100], [0, 0, 230], [119, 11, 32],
    ],
    dtype=np.uint8,
)

# In the order of the ids MMSegmentation's converter writes (tools/convert_datasets/pascal_context.py:
# the position of each labels.txt id among the 59 sorted ids; labels.txt is alphabetical), as its
# PascalContextDataset lists them; not the Detail API's eval order (VOC's 20 classes first).
PASCAL_CONTEXT_60_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant",
    "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track",
    "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
PASCAL_CONTEXT_59_CLASSES: tuple[str, ...] = PASCAL_CONTEXT_60_CLASSES[1:]

COCO_STUFF_CLASSES: tuple[str, ...] = (
    # 80 things
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    # 91 stuff
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)


def label_colormap(num_colors: int) -> np.ndarray:
    """Deterministic, well-separated colours: ``[num_colors, 3]`` uint8, id 0 is black.

    The bits of each id are spread over the three channels from the most significant bit down
    (the Pascal VOC colour map), so neighbouring ids get very different colours.
    """
    ids = np.arange(num_colors, dtype=np.int64)
    colors = np.zeros((num_colors, 3), dtype=np.int64)
    for shift in range(8):  # 8 bit planes; loops over bits, not over pixels or ids
        for channel in range(3):
            bit = (ids >> (3 * shift + channel)) & 1
            colors[:, channel] |= bit << (7 - shift)
    return colors.astype(np.uint8)


ADE20K_PALETTE = label_colormap(len(ADE20K_CLASSES) + 1)[1:]  # raw id 0 ("other") dropped
PASCAL_CONTEXT_60_PALETTE = label_colormap(len(PASCAL_CONTEXT_60_CLASSES))
PASCAL_CONTEXT_59_PALETTE = PASCAL_CONTEXT_60_PALETTE[1:]
COCO_STUFF_PALETTE = label_colormap(len(COCO_STUFF_CLASSES) + 1)[1:]  # raw id 0 = unlabeled

# The counts are facts of the benchmarks; a typo in a list above is a bug, not a user error.
assert (len(ADE20K_CLASSES), len(CITYSCAPES_CLASSES), len(CITYSCAPES_PALETTE), len(CITYSCAPES_LABEL_IDS)) == (
    150, 19, 19, 19)
assert (len(PASCAL_CONTEXT_60_CLASSES), len(COCO_STUFF_CLASSES)) == (60, 171)
for _array in (CITYSCAPES_PALETTE, ADE20K_PALETTE, PASCAL_CONTEXT_60_PALETTE, PASCAL_CONTEXT_59_PALETTE,
               COCO_STUFF_PALETTE):
    _array.setflags(write=False)  # module constants: never mutated
del _array


def palette_for(classes: tuple[str, ...], known: tuple[str, ...], known_palette: np.ndarray) -> np.ndarray:
    """The palette for ``classes``: the known one when the names are the known set's, else a colour map."""
    if tuple(classes) == tuple(known):
        return known_palette
    return label_colormap(len(classes) + 1)[1:]
