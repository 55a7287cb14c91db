// Package radio will hold the serial radio links: ports opened with
// tarm/serial, reconnect on unplug, and the frame codecs (MySensors serial
// API, JSON lines). It feeds the same pipeline as the MQTT link
// (pipeline.Submit), which is the seam it plugs into.
package radio
