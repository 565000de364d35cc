// A Node.js `http` app for the rolling-restart rig: about 2 ms of work per request, and on
// SIGTERM the graceful shutdown Node programs use, server.close() (stop accepting; idle
// keep-alive connections closed; busy ones served until the client closes them).
"use strict";
const http = require("node:http");

const port = Number(process.argv[process.argv.indexOf("--port") + 1] || 8080);
const server = http.createServer((req, res) => {
  req.resume();
  req.on("end", () => {
    setTimeout(() => {
      res.writeHead(200, { "content-type": "text/plain", "content-length": 2 });
      res.end("ok");
    }, 2);
  });
});
server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => server.close(() => process.exit(0)));
