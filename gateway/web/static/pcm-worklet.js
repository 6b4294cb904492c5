// AudioWorklet: microphone samples (at the AudioContext's rate, often 48 kHz) -> mono PCM s16le at
// processorOptions.targetRate (16 kHz), posted to the page in chunks of processorOptions.chunkS.
// Each output sample averages the input samples since the previous one (a box filter against
// aliasing), then linear interpolation places it between input samples.
"use strict";

class Pcm16Resampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, chunkS = 0.02 } = options.processorOptions || {};
    this.step = sampleRate / targetRate;        // input samples per output sample
    this.pos = 0;                                // next output position, in input samples from `prev`
    this.prev = 0;                               // last input sample of the previous block
    this.sum = 0; this.count = 0;                // box filter accumulator
    this.chunk = Math.round(targetRate * chunkS);  // samples per message
    this.out = new Int16Array(this.chunk);
    this.n = 0;
  }

  emit(value) {
    this.out[this.n++] = Math.max(-1, Math.min(1, value)) * 0x7fff;
    if (this.n === this.chunk) {
      this.port.postMessage(this.out.buffer, [this.out.buffer]);  // transferred: this.out is now empty
      this.out = new Int16Array(this.chunk);
      this.n = 0;
    }
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || !channels.length) return true;
    const len = channels[0].length;
    const x = new Float32Array(len + 1);         // x[0] = previous block's last sample
    x[0] = this.prev;
    for (let i = 0; i < len; i++) {
      let v = 0;
      for (const ch of channels) v += ch[i];
      x[i + 1] = v / channels.length;            // mono mix
    }
    let read = 1;
    while (this.pos + 1 < x.length) {
      for (; read <= Math.floor(this.pos) + 1 && read < x.length; read++) { this.sum += x[read]; this.count++; }
      const i = Math.floor(this.pos), f = this.pos - i;
      const interpolated = x[i] * (1 - f) + x[i + 1] * f;
      const value = this.step > 1 && this.count ? this.sum / this.count : interpolated;
      this.sum = 0; this.count = 0;
      this.emit(value);
      this.pos += this.step;
    }
    for (; read < x.length; read++) { this.sum += x[read]; this.count++; }
    this.pos -= len;
    this.prev = x[len];
    return true;
  }
}

registerProcessor("pcm16-resampler", Pcm16Resampler);
