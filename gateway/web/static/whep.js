// WebRTC (WHEP) viewer of a live avatar session: the browser side of gateway/web/whep.py.
//
//   const viewer = await window.avatarWhep.watch(sessionId, videoElement, baseUrl, token);
//   ...
//   await viewer.stop();   // DELETE on the viewer resource, then the connection closes
//
// The offer is sent once ICE gathering is complete (the server does not take trickled
// candidates). baseUrl defaults to the page's origin; token, when given, goes in the
// Authorization header. watch() rejects with the server's reason when the offer is refused.
(() => {
  "use strict";

  const GATHER_TIMEOUT_MS = 3000; // send what was gathered by then (host candidates come at once)

  function gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState !== "complete") return;
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, GATHER_TIMEOUT_MS);
    });
  }

  async function reasonOf(response) {
    const text = await response.text();
    try {
      return JSON.parse(text).error || text;
    } catch (_) {
      return text || response.statusText;
    }
  }

  async function watch(sessionId, videoElement, baseUrl, token) {
    const base = new URL(baseUrl || window.location.origin, window.location.href);
    const endpoint = new URL(`v1/sessions/${encodeURIComponent(sessionId)}/whep`, base.href.replace(/\/?$/, "/"));
    const headers = { "Content-Type": "application/sdp" };
    if (token) headers.Authorization = `Bearer ${token}`;

    const pc = new RTCPeerConnection();
    const stream = new MediaStream();
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    pc.addEventListener("track", (event) => {
      stream.addTrack(event.track);
      if (videoElement.srcObject !== stream) videoElement.srcObject = stream;
    });

    let resource = null;
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc);
      const response = await fetch(endpoint, { method: "POST", headers, body: pc.localDescription.sdp });
      if (response.status !== 201) {
        throw new Error(`WHEP offer refused (${response.status}): ${await reasonOf(response)}`);
      }
      const location = response.headers.get("Location");
      resource = location ? new URL(location, endpoint) : null;
      await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    } catch (err) {
      pc.close();
      throw err;
    }
    videoElement.play().catch(() => {}); // autoplay may need muted; the caller decides

    let stopped = false;
    return {
      pc,
      async stop() {
        if (stopped) return;
        stopped = true;
        if (resource) {
          const auth = token ? { Authorization: `Bearer ${token}` } : {};
          await fetch(resource, { method: "DELETE", headers: auth }).catch(() => {});
        }
        pc.close();
        stream.getTracks().forEach((t) => t.stop());
        if (videoElement.srcObject === stream) videoElement.srcObject = null;
      },
    };
  }

  window.avatarWhep = { watch };
})();
