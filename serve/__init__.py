"""Using a trained model bundle: the prediction CLI, the web app and Grad-CAM explanations.

Not a DVC stage: nothing here writes pipeline outputs. Every image goes through the stages'
decode path (:mod:`skinlesion.core.images`) and every prediction through
:class:`skinlesion.model.bundle.Bundle`, so serving cannot disagree with training or evaluation
about preprocessing, members, weights, temperature or the malignant threshold.

* ``python -m serve.predict PATH...``: a batch job over files, folders or a CSV of paths.
* ``python -m serve.web``: a small web app on 127.0.0.1 (upload, results, model card); its parts
  are :mod:`serve.limits`, :mod:`serve.upload`, :mod:`serve.page` and :mod:`serve.security`.
"""
