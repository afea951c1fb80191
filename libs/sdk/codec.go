package sdk

import (
	"bytes"
	"compress/flate"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Codec transforms every payload Kagzi stores or sends on a workflow's behalf — inputs,
// step outputs, workflow outputs and error messages — so that PostgreSQL, NATS and the
// services' logs only ever see opaque bytes. Associated data binds each payload to its
// place (run id and step key), so a ciphertext moved to another run or step fails to
// decode instead of being replayed as someone else's result.
//
// The worker and every client that starts runs or reads results must use the same codec.
type Codec interface {
	Encode(plain, associated []byte) ([]byte, error)
	Decode(sealed, associated []byte) ([]byte, error)
}

// ErrCodec means a payload failed to decode: tampered with, moved, or sealed with another
// key. A run whose history fails to decode stops (fails closed) rather than replaying it.
var ErrCodec = errors.New("payload failed to decode")

// NewAEADCodec returns a codec that compresses (payloads over 1 KiB) and then seals with
// AES-256-GCM under key (32 bytes), with a fresh random nonce per payload.
func NewAEADCodec(key []byte) (Codec, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("%w: AEAD codec key is %d bytes, want 32", ErrInvalidArgument, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("create cipher: %w", err)
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("create GCM: %w", err)
	}
	return &aeadCodec{aead: gcm}, nil
}

type aeadCodec struct{ aead cipher.AEAD }

const (
	flagPlain      = 0
	flagCompressed = 1
	compressOver   = 1 << 10
)

func (c *aeadCodec) Encode(plain, ad []byte) ([]byte, error) {
	flag := byte(flagPlain)
	body := plain
	if len(plain) > compressOver {
		var buf bytes.Buffer
		w, _ := flate.NewWriter(&buf, flate.BestSpeed)
		_, _ = w.Write(plain)
		_ = w.Close()
		if buf.Len() < len(plain) {
			flag, body = flagCompressed, buf.Bytes()
		}
	}
	nonce := make([]byte, c.aead.NonceSize(), c.aead.NonceSize()+1+len(body)+c.aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("codec nonce: %w", err)
	}
	// The flag is sealed with the payload, so it cannot be flipped to confuse Decode.
	return c.aead.Seal(nonce, nonce, append([]byte{flag}, body...), ad), nil
}

func (c *aeadCodec) Decode(sealed, ad []byte) ([]byte, error) {
	n := c.aead.NonceSize()
	if len(sealed) < n+1 {
		return nil, fmt.Errorf("%w: %d bytes is too short", ErrCodec, len(sealed))
	}
	opened, err := c.aead.Open(nil, sealed[:n], sealed[n:], ad)
	if err != nil || len(opened) == 0 {
		return nil, fmt.Errorf("%w: authentication failed", ErrCodec)
	}
	switch opened[0] {
	case flagPlain:
		return opened[1:], nil
	case flagCompressed:
		out, err := io.ReadAll(io.LimitReader(flate.NewReader(bytes.NewReader(opened[1:])), 64<<20))
		if err != nil {
			return nil, fmt.Errorf("%w: decompress: %v", ErrCodec, err)
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w: unknown flag %d", ErrCodec, opened[0])
}

// envelopePrefix marks a sealed payload. Sealed payloads travel and are stored as a JSON
// string, so the scheduler's JSON validation and the wire format stay the same.
const envelopePrefix = "kagzi:v1:"

// payloads applies a worker's or client's codec (or none) with the associated data that
// names each payload's place.
type payloads struct{ codec Codec }

func adInput(runID string) []byte     { return []byte(runID + "/input") }
func adOutput(runID string) []byte    { return []byte(runID + "/output") }
func adError(runID string) []byte     { return []byte(runID + "/error") }
func adStep(runID, key string) []byte { return []byte(runID + "/step/" + key) }
func (p payloads) enabled() bool      { return p.codec != nil }

// seal turns a JSON payload into its stored form.
func (p payloads) seal(plain, ad []byte) ([]byte, error) {
	if p.codec == nil {
		return plain, nil
	}
	sealed, err := p.codec.Encode(plain, ad)
	if err != nil {
		return nil, fmt.Errorf("encode payload: %w", err)
	}
	return json.Marshal(envelopePrefix + base64.RawStdEncoding.EncodeToString(sealed))
}

// open reverses seal. With a codec, a payload that is not an envelope is refused: a
// plaintext row where ciphertext belongs is as suspect as a forged one.
func (p payloads) open(stored, ad []byte) ([]byte, error) {
	if p.codec == nil {
		return stored, nil
	}
	var s string
	if err := json.Unmarshal(stored, &s); err != nil || !strings.HasPrefix(s, envelopePrefix) {
		return nil, fmt.Errorf("%w: not a sealed payload", ErrCodec)
	}
	sealed, err := base64.RawStdEncoding.DecodeString(s[len(envelopePrefix):])
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCodec, err)
	}
	return p.codec.Decode(sealed, ad)
}

// sealText and openText carry error messages, which are stored as text.
func (p payloads) sealText(msg string, ad []byte) string {
	if p.codec == nil {
		return msg
	}
	sealed, err := p.seal([]byte(msg), ad)
	if err != nil {
		return "error message withheld: " + err.Error()
	}
	var s string
	_ = json.Unmarshal(sealed, &s)
	return s
}

func (p payloads) openText(stored string, ad []byte) string {
	if p.codec == nil || !strings.HasPrefix(stored, envelopePrefix) {
		return stored
	}
	quoted, _ := json.Marshal(stored)
	plain, err := p.open(quoted, ad)
	if err != nil {
		return "(sealed error message that failed to decode: " + err.Error() + ")"
	}
	return string(plain)
}
