"""FastAPI + uvicorn with the room-manager pattern from FastAPI's WebSocket docs."""

from collections import defaultdict

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


class ConnectionManager:
    def __init__(self) -> None:
        self.rooms: dict[str, set[WebSocket]] = defaultdict(set)

    async def connect(self, websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        self.rooms[room].add(websocket)

    def disconnect(self, websocket: WebSocket, room: str) -> None:
        self.rooms[room].discard(websocket)

    async def broadcast(self, room: str, message: str) -> None:
        for connection in list(self.rooms[room]):
            try:
                await connection.send_text(message)
            except Exception:
                self.rooms[room].discard(connection)


manager = ConnectionManager()


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket, room: str = "default") -> None:
    await manager.connect(websocket, room)
    try:
        while True:
            data = await websocket.receive_text()
            await manager.broadcast(room, data)
    except WebSocketDisconnect:
        manager.disconnect(websocket, room)
