"""The hostile-upload corpus for quantlab.safe_load, built inside the tests (no committed binaries).

Every refusal must be a one-line QuantLabError naming the problem and the fix ("problem; fix"),
and hostile files must leave no side effect (marker files, extracted members, imported modules).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest

from quantlab import safe_load
from quantlab.errors import DatasetError, ModelError, QuantLabError
from quantlab.safe_load import (
    LoadedModel,
    UploadLimits,
    check_file_size,
    check_model_config,
    extract_zip_safely,
    inspect_h5_config,
    inspect_keras_archive,
    load_keras_model,
    load_npz_dataset,
    load_tflite_bytes,
    validate_dataset_for_model,
)

MB = 1024 * 1024


# --------------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------------


def assert_clear(exc: BaseException, *fragments: str) -> str:
    """One line, 'problem; fix', and names what went wrong."""
    message = str(exc)
    assert isinstance(exc, QuantLabError)
    assert "\n" not in message and "\r" not in message, message
    assert ";" in message, f"no fix in: {message}"
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in: {message}"
    return message


@pytest.fixture(scope="session")
def tfk():
    from quantlab.tfcompat import import_tensorflow

    tf, tf_keras = import_tensorflow()
    return tf, tf_keras


def tiny_sequential(tf_keras, classes: int = 3):
    model = tf_keras.Sequential([
        tf_keras.layers.Input((8, 8, 1)),
        tf_keras.layers.Conv2D(2, 3, activation="relu"),
        tf_keras.layers.Flatten(),
        tf_keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def payload_function(marker: Path):
    """A function that writes `marker` when called: stands in for any code an attacker ships."""
    source = (
        "def payload(x):\n"
        f"    open({str(marker)!r}, 'w').write('pwned')\n"
        "    return x\n"
    )
    namespace: dict = {}
    exec(compile(source, "<payload>", "exec"), namespace)
    return namespace["payload"]


def lambda_model_file(tf_keras, path: Path, marker: Path) -> Path:
    """A tf_keras model whose Lambda layer runs the payload; the marker is removed after saving."""
    inputs = tf_keras.Input((4,))
    hidden = tf_keras.layers.Lambda(payload_function(marker), name="evil")(inputs)
    outputs = tf_keras.layers.Dense(2, activation="softmax")(hidden)
    tf_keras.Model(inputs, outputs).save(path)
    marker.unlink(missing_ok=True)  # building the model called it once
    assert not marker.exists()
    return path


def zip_dir(folder: Path, zip_path: Path, prefix: str = "model") -> Path:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, f"{prefix}/{file.relative_to(folder).as_posix()}")
    return zip_path


def rewrite_zip_member(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members[member] = data
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)


def patch_declared_size(path: Path, member: str, size: int) -> None:
    """Make a zip lie: set `member`'s uncompressed size in both its local and central headers."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        offset = zf.getinfo(member).header_offset
    struct.pack_into("<I", raw, offset + 22, size)
    name = member.encode()
    position = raw.find(b"PK\x01\x02")
    while position != -1:
        name_length = struct.unpack_from("<H", raw, position + 28)[0]
        if raw[position + 46: position + 46 + name_length] == name:
            struct.pack_into("<I", raw, position + 24, size)
        position = raw.find(b"PK\x01\x02", position + 4)
    path.write_bytes(bytes(raw))


def base_config() -> dict:
    return {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4]}},
        {"class_name": "Dense", "config": {"units": 2, "activation": "softmax"}},
    ]}}


def with_layer(layer: dict) -> dict:
    config = base_config()
    config["config"]["layers"].insert(1, layer)
    return config


# --------------------------------------------------------------------------------------------------
# Keras configs: code that would run on load
# --------------------------------------------------------------------------------------------------


def test_tf_keras_runs_h5_lambda_code_even_in_safe_mode(tfk, tmp_path):
    """Control: the hostile .h5 below really executes its payload in plain tf_keras."""
    _, tf_keras = tfk
    marker = tmp_path / "marker.txt"
    path = lambda_model_file(tf_keras, tmp_path / "model.h5", marker)
    tf_keras.models.load_model(path, compile=False, safe_mode=True)
    assert marker.exists(), "payload did not fire: the guard test below would prove nothing"


def test_h5_with_lambda_is_refused_before_any_code_runs(tfk, tmp_path):
    _, tf_keras = tfk
    marker = tmp_path / "marker.txt"
    path = lambda_model_file(tf_keras, tmp_path / "model.h5", marker)
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    message = assert_clear(info.value, "model.h5", "Lambda", "upload a .tflite")
    assert "'evil'" in message
    assert not marker.exists()


def test_keras_archive_with_lambda_is_refused(tfk, tmp_path):
    _, tf_keras = tfk
    marker = tmp_path / "marker.txt"
    path = lambda_model_file(tf_keras, tmp_path / "model.keras", marker)
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    assert_clear(info.value, "model.keras", "Lambda", "re-save")
    assert not marker.exists()


def test_keras3_archive_with_lambda_is_refused(tfk, tmp_path):
    import keras

    marker = tmp_path / "marker.txt"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(payload_function(marker)),
                              keras.layers.Dense(2, activation="softmax")])
    model.save(tmp_path / "k3.keras")
    marker.unlink(missing_ok=True)
    with pytest.raises(ModelError) as info:
        load_keras_model(tmp_path / "k3.keras", tmp_path / "work")
    assert_clear(info.value, "Lambda")
    assert not marker.exists()


def test_keras_savedmodel_with_lambda_is_refused(tfk, tmp_path):
    """tf_keras also ignores safe_mode for SavedModels: their keras_metadata.pb is walked too."""
    _, tf_keras = tfk
    marker = tmp_path / "marker.txt"
    inputs = tf_keras.Input((4,))
    hidden = tf_keras.layers.Lambda(payload_function(marker), name="evil")(inputs)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2, activation="softmax")(hidden))
    model.save(tmp_path / "sm", save_format="tf")
    marker.unlink(missing_ok=True)
    zip_path = zip_dir(tmp_path / "sm", tmp_path / "lambda_savedmodel.zip")
    with pytest.raises(ModelError) as info:
        load_keras_model(zip_path, tmp_path / "work")
    assert_clear(info.value, "lambda_savedmodel.zip", "Lambda")
    assert not marker.exists()


def _evil_module(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """A module on sys.path that writes a marker when imported."""
    name = f"evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported.txt"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    return name, marker


def _keras_file_importing(tf_keras, tmp_path: Path, module: str) -> Path:
    path = tmp_path / "model.keras"
    tiny_sequential(tf_keras).save(path)
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
    config["module"] = module  # tf_keras imports the top-level object's module to find the class
    rewrite_zip_member(path, "config.json", json.dumps(config).encode())
    return path


def test_tf_keras_imports_modules_named_in_keras_configs(tfk, tmp_path, monkeypatch):
    """Control: tf_keras (safe_mode=True) imports any module a .keras config names."""
    _, tf_keras = tfk
    module, marker = _evil_module(tmp_path, monkeypatch)
    path = _keras_file_importing(tf_keras, tmp_path, module)
    try:
        tf_keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception:
        pass
    assert marker.exists(), "module was not imported: the guard test below would prove nothing"
    sys.modules.pop(module, None)


def test_keras_config_naming_a_foreign_module_is_refused_without_importing_it(
        tfk, tmp_path, monkeypatch):
    _, tf_keras = tfk
    module, marker = _evil_module(tmp_path, monkeypatch)
    path = _keras_file_importing(tf_keras, tmp_path, module)
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    assert_clear(info.value, module, "upload a .tflite")
    assert not marker.exists()
    assert module not in sys.modules


HOSTILE_CONFIGS = {
    "custom class": (with_layer({"class_name": "MyFancyLayer", "config": {"name": "fancy"}}),
                     "MyFancyLayer"),
    "custom registered name": (with_layer({"module": "keras.layers", "class_name": "Dense",
                                           "registered_name": "mypkg>Dense", "config": {}}),
                               "mypkg>Dense"),
    "custom module": (with_layer({"module": "mypkg.layers", "class_name": "Dense",
                                  "config": {}}), "mypkg.layers"),
    "os.system as activation": (with_layer({"class_name": "Dense", "config": {
        "units": 2, "activation": {"module": "os", "class_name": "function", "config": "system",
                                   "registered_name": "function"}}}), "os.system"),
    "keras.config.enable_unsafe_deserialization": (with_layer({"class_name": "Activation",
        "config": {"activation": {"module": "keras.config", "class_name": "function",
                                  "config": "enable_unsafe_deserialization"}}}),
        "enable_unsafe_deserialization"),
    "keras.utils.get_file": (with_layer({"module": "keras.utils", "class_name": "get_file",
                                         "config": {"origin": "http://x"}}), "keras.utils"),
    "keras 3 __lambda__": (with_layer({"class_name": "Activation", "config": {"activation": {
        "class_name": "__lambda__", "config": {"code": "AAAA", "defaults": None,
                                               "closure": None}}}}), "Lambda"),
    "typespec from any module": (with_layer({"class_name": "__typespec__", "config": {
        "spec_name": "Evil", "module": "evil", "registered_name": None, "serialized": []}}),
        "__typespec__"),
    "TFOpLambda writing a file": (with_layer({"class_name": "TFOpLambda", "config": {
        "name": "tf.io.write_file", "function": "io.write_file"}}), "io.write_file"),
    "TFSMLayer loading a server path": (with_layer({"class_name": "TFSMLayer", "config": {
        "filepath": "/srv/other_model"}}), "TFSMLayer"),
    "StringLookup reading a server file": (with_layer({"class_name": "StringLookup", "config": {
        "vocabulary": "/etc/passwd"}}), "StringLookup"),
    "Lambda in a nested model": (with_layer({"class_name": "Functional", "config": {
        "name": "inner", "layers": [{"class_name": "Lambda", "name": "hidden",
                                     "config": {"name": "hidden", "function": ["AAAA", None, None],
                                                "function_type": "lambda"}}]}}), "Lambda"),
    "Lambda in a TimeDistributed wrapper": (with_layer({"class_name": "TimeDistributed",
        "config": {"layer": {"class_name": "Lambda", "config": {"function": "print",
                                                               "function_type": "function"}}}}),
        "Lambda"),
    "bytecode in another layer": (with_layer({"class_name": "Dense", "config": {
        "units": 2, "function": ["AAAA", None, None], "function_type": "lambda"}}),
        "Python code"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_config_is_refused(case):
    config, fragment = HOSTILE_CONFIGS[case]
    with pytest.raises(ModelError) as info:
        check_model_config(config, "upload.keras")
    assert_clear(info.value, "upload.keras", fragment)


def test_config_that_is_not_a_model_is_refused():
    with pytest.raises(ModelError) as info:
        check_model_config({"class_name": "Dense", "config": {}}, "model.h5")
    assert_clear(info.value, "not describe a Keras model", "model.save")


def test_absurdly_deep_config_is_refused_without_recursion_error():
    config = base_config()
    node = config["config"]
    for _ in range(5000):
        node["nested"] = {}
        node = node["nested"]
    with pytest.raises(ModelError) as info:
        check_model_config(config, "deep.keras")
    assert_clear(info.value, "nested")


def test_real_tf_keras_and_keras3_configs_pass(tfk, tmp_path):
    import keras

    _, tf_keras = tfk
    inputs = tf_keras.Input((4,))
    hidden = tf_keras.layers.Dense(3)(inputs) + 1.0  # a TFOpLambda layer
    hidden = tf_keras.layers.TimeDistributed(tf_keras.layers.Dense(2))(
        tf_keras.layers.Reshape((3, 1))(hidden))
    outputs = tf_keras.layers.Dense(2, activation="softmax")(tf_keras.layers.Flatten()(hidden))
    check_model_config(json.loads(tf_keras.Model(inputs, outputs).to_json()), "tfk.h5")

    k_inputs = keras.Input((4,))
    k_hidden = keras.ops.relu(keras.layers.Dense(3)(k_inputs) * 2.0)
    k_outputs = keras.layers.Dense(2, activation=keras.activations.gelu)(k_hidden)
    k_model = keras.Model(k_inputs, k_outputs)
    k_model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    k_model.save(tmp_path / "k3.keras")
    with zipfile.ZipFile(tmp_path / "k3.keras") as zf:
        check_model_config(json.loads(zf.read("config.json")), "k3.keras")


def test_layer_allow_list_is_built_in_and_excludes_code_layers(tfk):
    import inspect

    import keras

    _, tf_keras = tfk
    builtin = {n for n in dir(tf_keras.layers) if inspect.isclass(getattr(tf_keras.layers, n))}
    builtin |= {n for n in dir(keras.layers) if inspect.isclass(getattr(keras.layers, n))}
    assert safe_load.LAYER_CLASSES <= builtin
    assert not safe_load.LAYER_CLASSES & {"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer",
                                          "FlaxLayer", "StringLookup", "TextVectorization", "Layer"}


# --------------------------------------------------------------------------------------------------
# Damaged and mislabeled model files
# --------------------------------------------------------------------------------------------------


def test_truncated_h5_is_refused(tfk, tmp_path):
    _, tf_keras = tfk
    good = tmp_path / "good.h5"
    tiny_sequential(tf_keras).save(good)
    bad = tmp_path / "model.h5"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError) as info:
        load_keras_model(bad, tmp_path / "work")
    assert_clear(info.value, "model.h5", "upload")


def test_non_hdf5_renamed_h5_is_refused(tmp_path):
    path = tmp_path / "model.h5"
    path.write_text("this is a CSV, not a model\n1,2,3\n")
    with pytest.raises(ModelError) as info:
        inspect_h5_config(path)
    assert_clear(info.value, "not an HDF5 model file")


def test_weights_only_h5_is_refused(tfk, tmp_path):
    _, tf_keras = tfk
    path = tmp_path / "model.weights.h5"
    tiny_sequential(tf_keras).save_weights(path)
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    assert_clear(info.value, "only weights", "model.save")


def test_h5_with_external_link_is_refused(tfk, tmp_path):
    import h5py

    _, tf_keras = tfk
    path = tmp_path / "model.h5"
    tiny_sequential(tf_keras).save(path)
    with h5py.File(path, "a") as h5:
        h5["model_weights/leak"] = h5py.ExternalLink("/etc/secrets.h5", "/")
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    assert_clear(info.value, "links to another file", "/etc/secrets.h5")


def test_non_model_renamed_keras_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"%PDF-1.7 definitely a slide deck\n" * 10)
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    assert_clear(info.value, "model.keras", "not a valid zip")


def test_zip_without_keras_config_renamed_keras_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(ModelError) as info:
        inspect_keras_archive(path)
    assert_clear(info.value, "not a Keras archive", "model.save('model.keras')")


def test_savedmodel_with_file_writing_op_is_refused(tfk, tmp_path):
    tf, _ = tfk
    marker = tmp_path / "written_by_graph.txt"

    class Exfiltrate(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones((4, 3)))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            tf.io.write_file(str(marker), "pwned")
            return tf.nn.softmax(x @ self.w)

    tf.saved_model.save(Exfiltrate(), str(tmp_path / "sm"))
    zip_path = zip_dir(tmp_path / "sm", tmp_path / "graph.zip")
    with pytest.raises(ModelError) as info:
        load_keras_model(zip_path, tmp_path / "work")
    assert_clear(info.value, "graph.zip", "WriteFile", "upload a .tflite")
    assert not marker.exists()


def test_unsupported_extension_is_refused(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    assert_clear(info.value, "unsupported type", ".keras")


# --------------------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------------------


def test_zip_slip_with_dotdot_is_refused(tmp_path):
    path = tmp_path / "upload.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/saved_model.pb", b"x")
        zf.writestr("../evil.txt", b"overwrite me")
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest)
    assert_clear(info.value, "escapes the folder", "../evil.txt")
    assert not list(tmp_path.rglob("evil.txt"))
    assert not dest.exists()


def test_zip_with_absolute_path_is_refused(tmp_path):
    target = tmp_path / "absolute_evil.txt"
    path = tmp_path / "upload.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/saved_model.pb", b"x")
        zf.writestr(zipfile.ZipInfo(str(target)), b"overwrite me")
    dest = tmp_path / "dest"
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest)
    assert_clear(info.value, "absolute path", "relative")
    assert not target.exists()
    assert not dest.exists()


def test_zip_with_symlink_member_is_refused(tmp_path):
    path = tmp_path / "upload.zip"
    link = zipfile.ZipInfo("model/variables/variables.index")
    link.external_attr = (0o120777 << 16)
    link.create_system = 3
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/saved_model.pb", b"x")
        zf.writestr(link, "/etc/passwd")
    dest = tmp_path / "dest"
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest)
    assert_clear(info.value, "symbolic link", "regular files")
    assert not dest.exists()


def test_zip_bomb_is_refused_from_declared_sizes(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("model/saved_model.pb", b"x")
        zf.writestr("model/variables/variables.data-00000-of-00001", bytes(50 * MB))
    assert path.stat().st_size < MB
    dest = tmp_path / "dest"
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest, UploadLimits(max_unpacked_bytes=10 * MB))
    assert_clear(info.value, "bomb.zip", "10.0 MB")
    assert not dest.exists()


def test_zip_with_lying_size_headers_is_refused_and_cleaned(tmp_path):
    path = tmp_path / "liar.zip"
    member = "model/variables/variables.data-00000-of-00001"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/saved_model.pb", b"x" * 100)  # extracted before the liar
        zf.writestr(member, bytes(5 * MB))
    patch_declared_size(path, member, 1000)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo(member).file_size == 1000
    dest = tmp_path / "dest"
    dest.mkdir()  # an existing empty folder must be left empty
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest, UploadLimits(max_unpacked_bytes=2 * MB))
    assert_clear(info.value, "liar.zip")
    assert dest.exists() and not any(dest.iterdir())


def test_zip_with_too_many_files_is_refused(tmp_path):
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(6):
            zf.writestr(f"model/f{i}", b"x")
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, tmp_path / "dest", UploadLimits(max_archive_files=5))
    assert_clear(info.value, "6 files", "limit of 5")
    assert not (tmp_path / "dest").exists()


def test_corrupt_zip_is_refused(tmp_path):
    path = tmp_path / "model.zip"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError) as info:
        load_keras_model(path, tmp_path / "work")
    assert_clear(info.value, "model.zip", "not a valid zip")


def test_truncated_zip_is_refused(tmp_path):
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/saved_model.pb", os.urandom(20000))
    path.write_bytes(path.read_bytes()[:-200])
    dest = tmp_path / "dest"
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest)
    assert_clear(info.value, "model.zip")
    assert not dest.exists()


def test_zip_without_saved_model_is_refused_and_cleaned(tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("holiday/1.jpg", b"\xff\xd8\xff")
    dest = tmp_path / "dest"
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest)
    assert_clear(info.value, "no saved_model.pb")
    assert not dest.exists()


def test_non_empty_destination_is_refused(tmp_path):
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/saved_model.pb", b"x")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("someone else's")
    with pytest.raises(ModelError) as info:
        extract_zip_safely(path, dest)
    assert_clear(info.value, "not empty")
    assert (dest / "keep.txt").read_text() == "someone else's"


def test_extract_returns_the_saved_model_root(tmp_path):
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("export/1/saved_model.pb", b"x")
        zf.writestr("export/1/variables/variables.index", b"y")
    root = extract_zip_safely(path, tmp_path / "dest")
    assert root == tmp_path / "dest" / "export" / "1"


# --------------------------------------------------------------------------------------------------
# .tflite and sizes
# --------------------------------------------------------------------------------------------------


def test_non_flatbuffer_tflite_is_refused(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a flatbuffer" * 4)
    with pytest.raises(ModelError) as info:
        load_tflite_bytes(path)
    assert_clear(info.value, "model.tflite", "TFL3")


def test_tflite_identifier_is_accepted(tmp_path):
    data = struct.pack("<I", 16) + b"TFL3" + bytes(56)
    path = tmp_path / "model.tflite"
    path.write_bytes(data)
    assert load_tflite_bytes(path) == data


def test_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.tflite"
    path.write_bytes(struct.pack("<I", 16) + b"TFL3" + bytes(2000))
    with pytest.raises(ModelError) as info:
        load_tflite_bytes(path, UploadLimits(max_bytes=1000))
    assert_clear(info.value, "big.tflite", "over the", "smaller")
    with pytest.raises(DatasetError) as info:
        check_file_size(path, UploadLimits(max_bytes=1000), DatasetError)
    assert_clear(info.value, "upload limit")


def test_symlinked_upload_is_refused(tmp_path):
    (tmp_path / "real.tflite").write_bytes(struct.pack("<I", 16) + b"TFL3" + bytes(56))
    (tmp_path / "link.tflite").symlink_to(tmp_path / "real.tflite")
    with pytest.raises(ModelError) as info:
        load_tflite_bytes(tmp_path / "link.tflite")
    assert_clear(info.value, "symbolic link")


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def good_arrays(n: int = 20) -> dict:
    rng = np.random.default_rng(0)
    return {"x_test": rng.random((n, 8, 8, 1), dtype=np.float32),
            "y_test": rng.integers(0, 3, n)}


class _WritesOnUnpickle:
    """Unpickling this calls open(marker, 'w'): what a hostile object array would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_npz_with_pickled_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled.txt"
    objects = np.empty(2, dtype=object)
    objects[0] = _WritesOnUnpickle(marker)
    objects[1] = _WritesOnUnpickle(marker)
    path = save_npz(tmp_path / "data.npz", x_test=objects, y_test=np.array([0, 1]))
    assert not marker.exists()
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "data.npz", "x_test", "Python objects", "numeric")
    assert not marker.exists()


@pytest.mark.parametrize("bad_value, word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_npz_with_non_finite_values_is_refused(tmp_path, bad_value, word):
    arrays = good_arrays()
    arrays["x_test"][3, 0, 0, 0] = bad_value
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(save_npz(tmp_path / "data.npz", **arrays))
    assert_clear(info.value, "x_test", word, "replace")


def test_npz_missing_x_test_is_refused(tmp_path):
    path = save_npz(tmp_path / "data.npz", y_test=good_arrays()["y_test"])
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "missing x_test", "np.savez")


def test_npz_without_labels_is_an_unlabelled_dataset(tmp_path):
    arrays = good_arrays()
    path = save_npz(tmp_path / "data.npz", x_test=arrays["x_test"], x_calib=arrays["x_test"][:3])
    loaded = load_npz_dataset(path)
    assert set(loaded) == {"x_test", "x_calib"}


def test_npz_with_x_train_but_no_labels_at_all_is_refused(tmp_path):
    arrays = good_arrays()
    path = save_npz(tmp_path / "data.npz", x_test=arrays["x_test"], x_train=arrays["x_test"])
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "x_train but no y_test", "x_calib")


def test_one_hot_labels_become_class_indices_and_say_so(tmp_path):
    arrays = good_arrays()
    y = np.asarray(arrays["y_test"])
    one_hot = np.eye(int(y.max()) + 1, dtype=np.float32)[y]
    path = save_npz(tmp_path / "data.npz", x_test=arrays["x_test"], y_test=one_hot)
    notes: list[str] = []
    loaded = load_npz_dataset(path, notes=notes)
    assert loaded["y_test"].tolist() == y.tolist()
    assert notes and "one-hot" in notes[0] and "argmax" in notes[0]


def test_soft_labels_are_refused_not_argmaxed(tmp_path):
    arrays = good_arrays()
    n = len(arrays["y_test"])
    soft = np.full((n, 2), 0.5, dtype=np.float32)
    path = save_npz(tmp_path / "data.npz", x_test=arrays["x_test"], y_test=soft)
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "y_test", "one-hot")


def test_npz_with_unexpected_key_is_refused(tmp_path):
    arrays = good_arrays()
    path = save_npz(tmp_path / "data.npz", X_test=arrays["x_test"], **{"y_test": arrays["y_test"]})
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "X_test", "x_test")


def test_npz_half_training_pair_is_refused(tmp_path):
    arrays = good_arrays()
    path = save_npz(tmp_path / "data.npz", x_train=arrays["x_test"], **arrays)
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "x_train but no y_train")


def test_npz_mismatched_lengths_is_refused(tmp_path):
    arrays = good_arrays()
    arrays["y_test"] = arrays["y_test"][:-3]
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(save_npz(tmp_path / "data.npz", **arrays))
    assert_clear(info.value, "20 samples", "17 labels")


@pytest.mark.parametrize("labels, fragment", [
    (np.array([0, 1, -1, 2] * 5), "-1"),
    (np.array([0.0, 1.5] * 10), "whole numbers"),
    (np.full((20, 3), 1 / 3), "np.argmax"),  # soft labels (one-hot rows are accepted)
    (np.array(["cat", "dog"] * 10), "dtype"),
])
def test_npz_bad_labels_are_refused(tmp_path, labels, fragment):
    arrays = good_arrays()
    arrays["y_test"] = labels
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(save_npz(tmp_path / "data.npz", **arrays))
    assert_clear(info.value, "y_test", fragment)


def test_npz_with_lying_array_header_is_refused(tmp_path):
    """A header claiming 10**12 floats must not make numpy allocate them."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x_test.npy", header.getvalue() + bytes(64))
        buffer = io.BytesIO()
        np.save(buffer, np.array([0]))
        zf.writestr("y_test.npy", buffer.getvalue())
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "x_test", "too small")


def test_npz_bomb_is_refused(tmp_path):
    path = tmp_path / "data.npz"
    np.savez_compressed(path, x_test=np.zeros((50 * MB // 4, 1), np.float32),
                        y_test=np.zeros(50 * MB // 4, np.int32))
    assert path.stat().st_size < MB
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path, UploadLimits(max_unpacked_bytes=10 * MB))
    assert_clear(info.value, "10.0 MB")


def test_non_npz_and_oversized_npz_are_refused(tmp_path):
    path = tmp_path / "data.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "not an .npz archive")
    big = save_npz(tmp_path / "big.npz", **good_arrays())
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(big, UploadLimits(max_bytes=100))
    assert_clear(info.value, "big.npz", "upload limit")


def test_dataset_wrong_shape_is_refused(tmp_path):
    arrays = load_npz_dataset(save_npz(tmp_path / "data.npz", **good_arrays()))
    with pytest.raises(DatasetError) as info:
        validate_dataset_for_model(arrays, (28, 28, 1), 3)
    assert_clear(info.value, "x_test", "(8, 8, 1)", "(28, 28, 1)", "reshape")


def test_dataset_labels_out_of_range_are_refused(tmp_path):
    arrays = load_npz_dataset(save_npz(tmp_path / "data.npz", **good_arrays()))
    with pytest.raises(DatasetError) as info:
        validate_dataset_for_model(arrays, (8, 8, 1), 2)
    assert_clear(info.value, "y_test", "label 2", "2 outputs")


def test_good_dataset_loads_and_gains_missing_channel(tmp_path):
    arrays = good_arrays()
    arrays["x_test"] = arrays["x_test"][..., 0]  # (N, 8, 8): channel left out
    arrays["x_calib"] = arrays["x_test"][:5]
    arrays["x_train"], arrays["y_train"] = arrays["x_test"], arrays["y_test"].astype(np.float64)
    loaded = load_npz_dataset(save_npz(tmp_path / "data.npz", **arrays))
    assert loaded["y_train"].dtype == np.int64
    ready = validate_dataset_for_model(loaded, (8, 8, 1), 3)
    assert ready["x_test"].shape == (20, 8, 8, 1)
    assert ready["x_calib"].shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(ready["y_test"], arrays["y_test"])


# --------------------------------------------------------------------------------------------------
# Legitimate models
# --------------------------------------------------------------------------------------------------


def _assert_same_predictions(original, loaded: LoadedModel):
    x = np.random.default_rng(1).random((4, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.keras_model.predict(x, verbose=0),
                               original.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_tf_keras_files_load(tfk, tmp_path, suffix):
    _, tf_keras = tfk
    model = tiny_sequential(tf_keras)
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = load_keras_model(path, tmp_path / "work")
    assert loaded.kind == "tf_keras"
    assert loaded.input_shape == (8, 8, 1) and loaded.num_classes == 3
    assert isinstance(loaded.keras_model, tf_keras.Model)
    assert loaded.require_keras_model() is loaded.keras_model
    _assert_same_predictions(model, loaded)


def test_tf_keras_savedmodel_zip_loads(tfk, tmp_path):
    _, tf_keras = tfk
    model = tiny_sequential(tf_keras, classes=4)
    model.save(tmp_path / "sm", save_format="tf")
    loaded = load_keras_model(zip_dir(tmp_path / "sm", tmp_path / "model.zip"), tmp_path / "work")
    assert loaded.kind == "tf_keras"
    assert loaded.input_shape == (8, 8, 1) and loaded.num_classes == 4
    assert (loaded.saved_model_dir / "saved_model.pb").is_file()
    _assert_same_predictions(model, loaded)


def test_zip_holding_a_keras_file_loads(tfk, tmp_path):
    _, tf_keras = tfk
    tiny_sequential(tf_keras).save(tmp_path / "inner.keras")
    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(tmp_path / "inner.keras", "export/inner.keras")
    loaded = load_keras_model(path, tmp_path / "work")
    assert loaded.kind == "tf_keras" and loaded.num_classes == 3


def test_plain_savedmodel_is_post_training_only(tfk, tmp_path):
    tf, _ = tfk

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones((4, 5)))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return tf.nn.softmax(x @ self.w)

    module = Classifier()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures=module.__call__)
    loaded = load_keras_model(zip_dir(tmp_path / "sm", tmp_path / "plain.zip"), tmp_path / "work")
    assert loaded.kind == "savedmodel" and loaded.keras_model is None
    assert loaded.input_shape == (4,) and loaded.num_classes == 5
    assert not loaded.supports_training_techniques
    with pytest.raises(ModelError) as info:
        loaded.require_keras_model()
    assert_clear(info.value, "plain TensorFlow SavedModel", "post-training")


def test_keras3_upload_of_standard_layers_is_rebuilt_in_tf_keras(tfk, tmp_path):
    import keras

    _, tf_keras = tfk
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.save(tmp_path / "k3.keras")
    assert inspect_keras_archive(tmp_path / "k3.keras")["keras_major"] == 3

    loaded = load_keras_model(tmp_path / "k3.keras", tmp_path / "work")
    assert loaded.kind == "tf_keras" and isinstance(loaded.keras_model, tf_keras.Model)
    assert loaded.supports_training_techniques and loaded.keras3_file.exists()
    assert loaded.input_shape == (8, 8, 1) and loaded.num_classes == 3
    assert loaded.keras_version.startswith("3.")
    assert any("Rebuilt in tf_keras" in note for note in loaded.notes)
    x = np.random.default_rng(2).random((4, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.keras_model.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_keras3_upload_with_a_keras3_only_layer_is_exported_for_post_training_only(tfk, tmp_path):
    import keras

    tf, _ = tfk
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))
    hidden = keras.layers.RMSNormalization(name="rms")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.save(tmp_path / "k3.keras")

    loaded = load_keras_model(tmp_path / "k3.keras", tmp_path / "work")
    assert loaded.kind == "keras3-savedmodel" and loaded.keras_model is None
    assert "'rms' (RMSNormalization)" in " ".join(loaded.notes)
    with pytest.raises(ModelError) as info:
        loaded.require_keras_model("quantization-aware training")
    assert_clear(info.value, "k3.keras is a Keras 3 model", "tf_keras", "post-training")

    # Post-training quantization still has what it needs: the export converts and agrees.
    converter = tf.lite.TFLiteConverter.from_saved_model(str(loaded.saved_model_dir))
    flatbuffer = converter.convert()
    assert flatbuffer[4:8] == b"TFL3"
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    x = np.random.default_rng(2).random((1, 8, 8, 1), dtype=np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Last line of defence
# --------------------------------------------------------------------------------------------------


def test_unexpected_internal_error_becomes_one_line_without_server_paths(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("boom in /srv/quantlab/internal/secret_config.py\nTraceback (most ...")

    monkeypatch.setattr(safe_load, "_load_model_path", explode)
    with pytest.raises(ModelError) as info:
        load_keras_model(tmp_path / "model.h5", tmp_path / "work")
    message = assert_clear(info.value, "model.h5", "RuntimeError", "upload the file again")
    assert "/srv/quantlab" not in message and "secret_config.py" in message


def test_savedmodel_folder_with_symlink_is_refused(tmp_path):
    folder = tmp_path / "sm"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"x")
    (folder / "variables" / "variables.index").symlink_to("/etc/passwd")
    with pytest.raises(ModelError) as info:
        load_keras_model(folder, tmp_path / "work")
    assert_clear(info.value, "symbolic link", "variables.index")


def test_npz_with_one_array_per_input_is_accepted_and_packed(tmp_path):
    from quantlab.uploads import load_uploaded_dataset

    rng = np.random.default_rng(0)
    path = save_npz(tmp_path / "two.npz", x_test_image=rng.random((6, 4, 4, 1), dtype=np.float32),
                    x_test_tokens=rng.integers(0, 9, (6, 5)), y_test=np.arange(6) % 2)
    dataset = load_uploaded_dataset(path)
    assert dataset.x_test.shape == (6, 5 + 16)  # packed in name order: image, then tokens
    assert json.loads(dataset.layout) == [["image", [4, 4, 1]], ["tokens", [5]]]


def test_npz_mixing_x_test_and_per_input_arrays_is_refused(tmp_path):
    arrays = good_arrays()
    path = save_npz(tmp_path / "mixed.npz", x_test=arrays["x_test"], x_test_other=arrays["x_test"],
                    y_test=arrays["y_test"])
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "x_test_<input name>")


def test_per_input_arrays_of_different_lengths_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = save_npz(tmp_path / "ragged.npz", x_test_a=rng.random((6, 3), dtype=np.float32),
                    x_test_b=rng.random((5, 3), dtype=np.float32))
    with pytest.raises(DatasetError) as info:
        load_npz_dataset(path)
    assert_clear(info.value, "different lengths")
