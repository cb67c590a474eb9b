"""PILOT: inpainting by latent optimisation on a text-to-image Stable Diffusion model (Pan et al., "Coherent and
Multi-modality Image Inpainting via Latent Space Optimization", arXiv 2407.08019 v2).

Modules: :mod:`~asuka.pipelines.pilot.objective` (the per-sample losses and masks, pure),
:mod:`~asuka.pipelines.pilot.schedule` (λ, step size, τ/K/γ plan, momentum, blend, pure),
:mod:`~asuka.pipelines.pilot.controls` (SBC and the semantic-term recorder on :mod:`asuka.attention`),
:mod:`~asuka.pipelines.pilot.pipeline` (``PilotInpaintPipeline``).
"""
