"""Planning a run before it starts: which layout, how fast, how many GPU-days (issue 36).

``hardware`` the GPU table; ``shapes`` the model / layout / software-stack descriptions;
``constants`` the model's global constants with their sources; ``steptime`` the analytic
step-time model; ``search`` every layout that fits memory (the memory planner of
:mod:`soda_mega.training.plan`), ranked; ``published`` the published Megatron-core runs it is
checked against; ``calibrate`` constants replaced by GPU campaign results. The command is
``soda-mega plan`` (:mod:`soda_mega.commands.plan`).
"""
