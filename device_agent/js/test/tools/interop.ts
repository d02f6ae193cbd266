/**
 * Helpers for tests/test_js_agent.py (Python drives them to check interoperability with real files):
 *
 *   node dist/test/tools/interop.js encode DELTA.pft OUT_DIR   TS-encode a delta (container of float32
 *                                                             tensors) in every encoding, dense and top-k
 *   node dist/test/tools/interop.js npz FILE.npz              print what the .npz reader sees, as JSON
 *   node dist/test/tools/interop.js ort MODEL.onnx            run a model on onnxruntime-node (input x = 1..n)
 *   node dist/test/tools/interop.js train MODEL STEP DATA OUT EPOCHS BATCH LR   train with the step, data in order
 *   node dist/test/tools/interop.js preprocess MODEL DATA.npz OUT.pft   the data as the model is fed (preprocessing)
 */

import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { bytesOf, dumps, loads, type RawTensor, toFloat32 } from "../../src/container.js";
import { readModel } from "../../src/model.js";
import { readNpz } from "../../src/node/npz.js";
import { preprocess } from "../../src/preprocessing.js";
import { ortRuntime, type OrtModule } from "../../src/runtime.js";
import { StepTrainer } from "../../src/trainer.js";
import { encodeUpdate } from "../../src/update.js";

async function main([command, input, out]: string[]): Promise<void> {
  if (command === "encode") {
    const container = loads(new Uint8Array(readFileSync(input!)));
    const delta = new Map([...container.tensors].map(([name, t]) => [name, toFloat32(t)]));
    const shapes = new Map([...container.tensors].map(([name, t]) => [name, t.shape]));
    for (const encoding of ["float32", "float16", "int8"] as const) {
      for (const topkFraction of [null, 0.1]) {
        const { body } = encodeUpdate(delta, shapes, {
          sampleCount: 42,
          roundId: 7,
          baseVersion: 3,
          encoding,
          topkFraction,
          metrics: { train_loss: 1.25, steps: 9 },
        });
        writeFileSync(join(out!, `${encoding}${topkFraction ? "-topk" : ""}.pfu`), body);
      }
    }
  } else if (command === "train") {
    // train MODEL.pfm STEP.onnx DATA.npz OUT.pft EPOCHS BATCH LR: the data in order, no shuffling
    const [stepPath, dataPath, outPath, epochs, batch, lr] = process.argv.slice(4);
    const ort = (await import("onnxruntime-node")).default as unknown as OrtModule;
    const model = readModel(new Uint8Array(readFileSync(input!)));
    const trainer = await StepTrainer.create(
      ortRuntime(ort, { intraOpNumThreads: 1 }),
      new Uint8Array(readFileSync(stepPath!)),
      model,
    );
    const losses: number[] = [];
    const result = await trainer.fit(readNpz(dataPath!), {
      epochs: Number(epochs),
      batchSize: Number(batch),
      lr: Number(lr),
      seed: 0,
      shuffle: false,
      onStep: (loss) => losses.push(loss),
    });
    const tensors: [string, RawTensor][] = [...result.weights].map(([name, values]) => [
      name,
      { dtype: "float32", shape: model.shapes.get(name)!, bytes: bytesOf(values) },
    ]);
    writeFileSync(outPath!, dumps(tensors, { losses }, "tensors"));
  } else if (command === "preprocess") {
    const [dataPath, outPath] = process.argv.slice(4);
    const model = readModel(new Uint8Array(readFileSync(input!)));
    const fed = preprocess(readNpz(dataPath!), model.preprocessing, model.inputs[0]!.shape);
    const x: [string, RawTensor] = [
      "x",
      { dtype: "float32", shape: [fed.size, ...fed.itemShape], bytes: bytesOf(fed.x) },
    ];
    writeFileSync(outPath!, dumps([x], { preprocessing: model.preprocessing }, "tensors"));
  } else if (command === "npz") {
    const data = readNpz(input!);
    let sum = 0;
    for (const v of data.x) sum += v;
    console.log(
      JSON.stringify({
        size: data.size,
        itemShape: data.itemShape,
        y: Array.from(data.y),
        xSum: sum,
        x0: Array.from(data.x.subarray(0, 5)),
      }),
    );
  } else if (command === "ort") {
    const ort = (await import("onnxruntime-node")).default as unknown as OrtModule;
    const runtime = ortRuntime(ort);
    const session = await runtime.createSession(new Uint8Array(readFileSync(input!)));
    const shape = (session.inputMetadata?.[0]?.shape ?? []).map((d) => (typeof d === "number" ? d : 1));
    const count = shape.reduce((a, b) => a * b, 1);
    const x = runtime.tensor(
      "float32",
      Float32Array.from({ length: count }, (_, i) => i + 1),
      shape,
    );
    const result = await session.run({ [session.inputNames[0]!]: x });
    const output = result[session.outputNames[0]!]!;
    console.log(JSON.stringify({ dims: output.dims, data: Array.from(output.data as Float32Array) }));
  } else {
    throw new Error(`unknown command ${command}`);
  }
}

main(process.argv.slice(2)).catch((error: unknown) => {
  console.error(error);
  process.exit(1);
});
