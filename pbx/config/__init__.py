"""pbx.yaml (CONTRACT §2): loaded once, validated, handed out as frozen dataclasses.

Every problem is reported as ``FILE:LINE: message`` and all of them are
collected in one pass, so an admin fixes a file in one go. The YAML is composed
into nodes (not constructed into plain objects) so that each value keeps the
line it came from (`pbx.yamlfile`, shared with the IVR flows).

- `model`: the typed config (`Config` and its parts) and `ConfigError`;
- `destinations`: ``KIND:TARGET`` destinations, read alike in pbx.yaml and the IVR flows;
- `reader`: the pbx.yaml reader (``${ENV}`` expansion) and the converters of its values;
- `sections`: one table of fields per section: keys, converters, defaults;
- `load`: `load_config`, from file to `Config`.

Import from those modules; this package exports nothing itself.
"""
