"""HarmonPaint (Li et al., "HarmonPaint: Harmonized Training-Free Diffusion Inpainting", arXiv:2507.16732):
training-free harmonious inpainting on a 9-channel Stable Diffusion inpainting model.

Modules: ``masks`` (token-mask pyramid, Eq. 7 soft mask), ``sams`` (Eqs. 4-7), ``makvs`` (Eqs. 10-13),
``steer`` (Eqs. 8-9 and the latent step schedule), ``schedule`` (the Efficient Division Strategy, §III-D).
"""
