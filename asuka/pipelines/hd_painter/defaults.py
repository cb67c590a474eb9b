"""HD-Painter's official defaults that are not numbers of one function (torch-free): the prompt pair of the
official inference script ``hd_inpaint.py`` and demo (not used by its evaluation script ``metrics/eval.py``)."""

POSITIVE_PROMPT = "Full HD, 4K, high quality, high resolution"
NEGATIVE_PROMPT = ("text, bad anatomy, bad proportions, blurry, cropped, deformed, disfigured, duplicate, error, "
                   "extra limbs, gross proportions, jpeg artifacts, long neck, low quality, lowres, malformed, morbid, "
                   "mutated, mutilated, out of frame, ugly, worst quality")
