// Bun's built-in WebSocket pub/sub, as its documentation writes it: join the room
// named in the URL, publish every text message to the room.
const port = Number(process.env.PORT ?? 9000);
const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  fetch(req, server) {
    const room = new URL(req.url).searchParams.get("room") ?? "default";
    if (server.upgrade(req, { data: { room } })) return;
    return new Response("expected a WebSocket upgrade", { status: 400 });
  },
  websocket: {
    open(ws) {
      ws.subscribe(ws.data.room);
    },
    message(ws, message) {
      server.publish(ws.data.room, message);
    },
  },
});
console.log(`listening on 127.0.0.1:${server.port}`);
