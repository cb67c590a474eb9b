"""HD-Painter (Manukyan et al., "HD-Painter: High-Resolution and Prompt-Faithful Text-Guided Image Inpainting with
Diffusion Models", arXiv 2312.14091; official code github.com/Picsart-AI-Research/HD-Painter).

Modules: :mod:`.preprocess` (sizes, masks, token set), :mod:`.painta` and :mod:`.rasg` (the two methods' math),
:mod:`.sr` (the inpainting-specialised x4 super-resolution) and :mod:`.blend` (Poisson blending).
"""
