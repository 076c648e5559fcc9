// Node `ws`, as its README writes it: rooms in a Map of Sets, broadcast by looping
// over the room, and the README's ping/pong heartbeat to drop dead connections.
const http = require("http");
const { WebSocketServer } = require("ws");

const port = Number(process.env.PORT || 9000);
const rooms = new Map();
const server = http.createServer();
const wss = new WebSocketServer({ server });

wss.on("connection", (ws, req) => {
  const room = new URL(req.url, "http://localhost").searchParams.get("room") || "default";
  let members = rooms.get(room);
  if (!members) rooms.set(room, (members = new Set()));
  members.add(ws);
  ws.isAlive = true;
  ws.on("pong", () => (ws.isAlive = true));
  ws.on("message", (data, isBinary) => {
    for (const client of members) {
      if (client.readyState === 1) client.send(data, { binary: isBinary });
    }
  });
  ws.on("close", () => {
    members.delete(ws);
    if (members.size === 0) rooms.delete(room);
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (ws.isAlive === false) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, 25000);
wss.on("close", () => clearInterval(heartbeat));

server.listen(port, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${port}`));
