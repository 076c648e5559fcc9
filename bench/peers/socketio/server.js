// Socket.IO 4, as its documentation writes rooms: `join` puts the socket in a
// room, every `msg` is emitted to the rooms the sender is in.
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 9000);
const server = http.createServer();
const io = new Server(server, { serveClient: false });

io.on("connection", (socket) => {
  socket.on("join", (room) => {
    socket.join(room);
    socket.emit("joined", room);
  });
  socket.on("msg", (data) => {
    for (const room of socket.rooms) {
      if (room !== socket.id) io.to(room).emit("msg", data);
    }
  });
});

server.listen(port, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${port}`));
