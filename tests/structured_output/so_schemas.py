"""JSON schemas the structured-output tests run through the bundled SmolLM2: nested objects,
arrays with min/max items, enums, bounded numbers, required fields, $ref/$defs. Strings are
bounded so that a 135M model finishes every object within a short max_tokens."""

NAME = {"type": "string", "minLength": 1, "maxLength": 12}

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "bool": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    "bounded_int": {"type": "integer", "minimum": 10, "maximum": 99},
    "bounded_number": {"type": "object", "properties": {"t": {"type": "number", "minimum": -5, "maximum": 5}},
                       "required": ["t"]},
    "array_min_max": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                      "minItems": 2, "maxItems": 3},
    "string_array": {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                                 "minItems": 1, "maxItems": 2}},
                     "required": ["tags"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999}, "role": {"enum": ["admin", "guest"]}},
        "required": ["id", "role"], "additionalProperties": False}}, "required": ["user"],
        "additionalProperties": False},
    "ref_defs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                                      "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                                     "required": ["x", "y"], "additionalProperties": False}},
                 "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
                 "required": ["a", "b"], "additionalProperties": False},
    "const": {"type": "object", "properties": {"kind": {"const": "event"}, "n": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 5}},
              "required": ["kind", "n"]},
    "nullable": {"type": "object", "properties": {"note": {"anyOf": [NAME, {"type": "null"}]}}, "required": ["note"]},
    "string_pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                       "required": ["code"]},
    "array_of_objects": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"k": {"enum": ["x", "y"]}, "v": {"type": "integer", "minimum": 0, "maximum": 50}},
        "required": ["k", "v"], "additionalProperties": False}},
    "one_of": {"oneOf": [{"type": "object", "properties": {"cat": {"enum": ["tabby"]}}, "required": ["cat"],
                          "additionalProperties": False},
                         {"type": "object", "properties": {"dog": {"enum": ["pug"]}}, "required": ["dog"],
                          "additionalProperties": False}]},
    "deep": {"type": "object", "properties": {"l1": {"type": "object", "properties": {"l2": {"type": "object", "properties": {
        "l3": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["l3"], "additionalProperties": False}},
        "required": ["l2"], "additionalProperties": False}}, "required": ["l1"], "additionalProperties": False},
    "enum_array_unique": {"type": "object", "properties": {"days": {"type": "array", "items": {"enum": ["mon", "tue"]},
                                                                    "minItems": 1, "maxItems": 2}},
                          "required": ["days"], "additionalProperties": False},
}
