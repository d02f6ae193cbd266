/**
 * The `metadata_props` of an ONNX model (ModelProto field 14: key/value strings), read straight from the
 * protobuf bytes: ONNX runtimes' JavaScript APIs do not expose them, and the training step keeps its
 * interface there (docs/training-step.md, "Metadata": the dropout masks' probabilities).
 */

const decoder = new TextDecoder();

class Reader {
  at = 0;
  constructor(readonly bytes: Uint8Array) {}

  varint(): number {
    let value = 0;
    let scale = 1;
    for (;;) {
      if (this.at >= this.bytes.length) throw new RangeError("truncated protobuf varint");
      const byte = this.bytes[this.at++]!;
      value += (byte & 0x7f) * scale;
      if (byte < 0x80) return value;
      scale *= 128;
      if (scale > 2 ** 63) throw new RangeError("protobuf varint too long");
    }
  }

  skip(wire: number): void {
    if (wire === 0) this.varint();
    else if (wire === 1) this.at += 8;
    else if (wire === 2) {
      const length = this.varint(); // read first: `this.at += this.varint()` would add to the old position
      this.at += length;
    } else if (wire === 5) this.at += 4;
    else throw new RangeError(`protobuf wire type ${wire} is not supported`);
    if (this.at > this.bytes.length) throw new RangeError("truncated protobuf field");
  }

  bytesField(): Uint8Array {
    const length = this.varint();
    if (this.at + length > this.bytes.length) throw new RangeError("truncated protobuf field");
    const out = this.bytes.subarray(this.at, this.at + length);
    this.at += length;
    return out;
  }
}

/** key -> value of the model's metadata_props; throws RangeError on malformed bytes. */
export function onnxMetadata(model: Uint8Array): Map<string, string> {
  const props = new Map<string, string>();
  const reader = new Reader(model);
  while (reader.at < model.length) {
    const tag = reader.varint();
    const field = Math.floor(tag / 8);
    const wire = tag % 8;
    if (field !== 14 || wire !== 2) {
      reader.skip(wire);
      continue;
    }
    const entry = new Reader(reader.bytesField());
    let key = "";
    let value = "";
    while (entry.at < entry.bytes.length) {
      const inner = entry.varint();
      if (inner === (1 << 3) + 2) key = decoder.decode(entry.bytesField());
      else if (inner === (2 << 3) + 2) value = decoder.decode(entry.bytesField());
      else entry.skip(inner % 8);
    }
    props.set(key, value);
  }
  return props;
}
