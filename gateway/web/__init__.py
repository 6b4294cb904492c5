"""HTTP/WebSocket/WebRTC front of the gateway (`avatar serve --http`): browsers and agent frameworks."""
