"""Other APIs' request and response shapes, translated to and from ``GenerateRequest``.

``a1111`` speaks AUTOMATIC1111's ``/sdapi/v1/*``, ``openai_images`` OpenAI's images API. Neither
generates anything itself: the controllers hand the translated request to
``service.controllers.generate.run_generation``, the code path of ``POST /v1/generate``.
"""
