"""GPU benchmark: yapd as a client sees it, raw AsyncLLM (the floor) and ``vllm serve``
(the alternative), with the same prompts, in one run, on one machine.

    python -m yapctl.gpubench MODELS_DIR [--out docs/bench] [--phases yapd,raw,serve]

MODELS_DIR holds ``nemo-12b`` and ``hammer-3b`` folders (configs + tokenizers; weights are
``load_format="dummy"``: real shapes, random values, real timings). Every phase writes
its figures to the JSON file as soon as it has them. A program that prints figures, not
a test: nothing here asserts a time.

Its parts: :mod:`.runsetup` (what a run holds fixed), :mod:`.prompts` (the turns' prompts),
:mod:`.measure` (a level and what is watched over it), :mod:`.servers` (the processes it
starts), one module per phase (:mod:`.yapdphase`, :mod:`.raw`, :mod:`.serve`,
:mod:`.pair`, :mod:`.starts`), :mod:`.results` and :mod:`.report` (the files it writes)
and :mod:`.cli`.
"""
